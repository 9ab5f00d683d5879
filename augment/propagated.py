"""The propagated source: real slices of the support volume next to its labelled support slices, each with
the support mask carried there by optical flow (label propagation within one subject).

The learned source warps a support onto OTHER subjects, which keeps the support's texture and puts the mask
where a coarse inter-subject registration says (label accuracy 38-46 % on CHAOS). This source keeps real
anatomy and real texture, like the oracle, by staying in the one volume the protocol labels: the slices at
`offsets` above and below each support slice are unlabelled images of the support volume (never a query
volume, and no label of it is read beyond the support slices). The mask is propagated slice by slice
(support -> z+1 -> z+2 ...) by TV-L1 optical flow between neighbouring images (`skimage.registration`).
Every pair passes label-free checks: the flow is not grossly folded where the label lies (share of pixels
with Jacobian determinant <= 0), and the mask, less its specks, is plausible against the support's
(`augment.masks.mask_problem`: area ratio, no new components). Offsets were chosen on the training
volumes' label accuracy (`benchmarks/augment_propagated.py`), never on test Dice. With `appearance`, each pair
then takes another subject's contrast (`augment.appearance.restyle_slices`): its mask is unchanged.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from scipy.ndimage import map_coordinates
from skimage.registration import optical_flow_tvl1

from augment.appearance import restyle_slices
from augment.config import PropagatedConfig
from augment.manifest import Provenance, SliceRef, refs, validate_manifest
from augment.masks import drop_fragments, mask_problem
from augment.pairs import PairError, as_pairs
from augment.registration import folded_share
from augment.synthesis import SyntheticSet, _jsonable, _support_refs
from augment.warped_pairs import PairChecks


def propagate(mask: np.ndarray, moving: np.ndarray, fixed: np.ndarray) -> tuple[np.ndarray, float]:
    """`mask` `(H, W)` (soft) of image `moving` carried onto `fixed` by TV-L1 flow; and the share of folded
    pixels where the label lies (source or result): folds in the air or far from the organ move no label."""
    flow = optical_flow_tvl1(fixed, moving)                          # (2, H, W): fixed(p) ~ moving(p + flow(p))
    grid = np.indices(mask.shape, dtype=np.float64)
    warped = map_coordinates(mask.astype(np.float32), grid + flow, order=1, mode="constant")
    return warped, folded_share(torch.from_numpy(flow), region=(mask > 0.5) | (warped > 0.5))


def propagation_candidates(support_masks: torch.Tensor, volume: np.ndarray, support_slices: Sequence[int],
                           offsets: Sequence[int], checks: PairChecks) -> list[list[dict]]:
    """Every candidate, one list per support: the slice at each offset (both ways, within the volume and not
    another support slice), its propagated `mask` `(H, W)` uint8 less its specks (components under
    `min_fragment_px` but the largest: the flow's noise, not anatomy), its measures and its `problem` (None: passes)."""
    labelled = {int(z) for z in support_slices}
    out = []
    for s, z0 in enumerate(map(int, support_slices)):
        source = support_masks[s, 0].numpy()
        rows = []
        for step in (-1, 1):
            soft, folded = source, 0.0
            for d in range(1, max(offsets) + 1):
                z = z0 + step * d
                if not 0 <= z < len(volume) or z in labelled:    # the volume's end, or another support's own label
                    break
                soft, f = propagate(soft, volume[z - step], volume[z])
                folded = max(folded, f)
                if d not in offsets:
                    continue
                mask, dropped = drop_fragments((soft > 0.5).astype(np.uint8), checks.min_fragment_px)
                problem = (f"folded share {folded:.4f} > {checks.max_folded_share}"
                           if folded > checks.max_folded_share else None)
                if problem is None:
                    why = mask_problem(mask, source.astype(np.uint8), checks.mask_config())
                    problem = None if why is None else f"propagated mask {why}"
                rows.append({"support": s, "slice": z, "offset": step * d, "problem": problem,
                             "folded_share": round(folded, 5), "area_ratio": round(float(mask.sum() / source.sum()), 3),
                             "dropped_fragments": dropped, "mask": mask})
        out.append(rows)
    return out


def propagated_pairs(support_images: torch.Tensor, support_masks: torch.Tensor, support_volume: np.ndarray,
                     support_slices: Sequence[int], n: int, seed: int, *, offsets: Sequence[int],
                     checks: PairChecks) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`n` pairs `(n, 1, H, W)`: slices of `support_volume` `(Z, H, W)` at `offsets` from each support slice,
    with propagated masks. Pair k uses support k mod S and its passing candidates nearest first (ties in a
    seeded order); a support none of whose candidates passes gives no pair, and if none passes at all a
    `PairError` names every candidate and its reason."""
    images, masks = as_pairs((support_images, support_masks), "support")
    volume = np.asarray(support_volume, np.float32)
    if volume.ndim != 3 or volume.shape[-2:] != tuple(images.shape[-2:]):
        raise PairError(f"support_volume must be (Z, {images.shape[-2]}, {images.shape[-1]}), got {volume.shape}")
    if len(support_slices) != len(images):
        raise PairError(f"{len(images)} supports but {len(support_slices)} support slices")
    if n < 1 or not offsets or min(offsets) < 1:
        raise PairError(f"n must be >= 1 and offsets positive, got n={n}, offsets={list(offsets)}")
    candidates = propagation_candidates(masks, volume, support_slices, offsets, checks)
    rng = np.random.default_rng(seed)
    passing = [sorted((r for r in rows if r["problem"] is None), key=lambda r: (abs(r["offset"]), rng.random()))
               for rows in candidates]
    used = [s for s, p in enumerate(passing) if p]
    if not used:
        reasons = "; ".join(f"support {r['support']} -> slice {r['slice']}: {r['problem']}"
                            for rows in candidates for r in rows) or "no slice within the offsets"
        raise PairError(f"every propagated pair failed the checks ({reasons})")
    out_i, out_m, pairs = [], [], []
    for k in range(n):
        s = used[k % len(used)]
        row = passing[s][(k // len(used)) % len(passing[s])]
        out_i.append(torch.from_numpy(volume[row["slice"]].copy()))
        out_m.append(torch.from_numpy(row["mask"].astype(np.float32)))
        pairs.append({"support": s, "slice": row["slice"], "offset": row["offset"]})
    n_cand = sum(len(rows) for rows in candidates)
    n_pass = sum(len(p) for p in passing)
    info = {"checks": dataclasses.asdict(checks), "offsets": list(offsets), "n_candidates": n_cand,
            "n_passed": n_pass, "share_passed": n_pass / max(n_cand, 1),
            "supports_without_pairs": [s for s in range(len(candidates)) if s not in used], "pairs": pairs,
            "candidates": [{k: v for k, v in r.items() if k != "mask"} for rows in candidates for r in rows]}
    return torch.stack(out_i)[:, None], torch.stack(out_m)[:, None], info


def make_set(checkpoint: Path | None, *, support: tuple[torch.Tensor, torch.Tensor, Sequence[SliceRef]],
             support_volume: np.ndarray, support_slices: Sequence[int], volumes: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray] | None, n: int, seed: int, fold: int, class_name: str,
             query_volumes: Sequence[str], offsets: Sequence[int], max_folded_share: float, min_area_ratio: float,
             max_area_ratio: float, min_fragment_px: int,
             appearance: bool = PropagatedConfig.appearance) -> SyntheticSet:
    """`n` pairs of a class from the support volume's unlabelled slices near its support slices; reads no label
    but the supports'. With `appearance`, each image takes the contrast of a slice of another of `volumes` (the
    fold's training volumes, images only); without, `volumes` is unused."""
    if labels is not None:
        raise PairError("the propagated source reads no label of the training volumes; pass labels=None")
    images, masks, ids = support
    refs_ = _support_refs(ids, len(images))
    where = f"propagated pairs, fold {fold}, class {class_name}"
    support_id = refs_[0].volume
    checks = PairChecks(max_folded_share=max_folded_share, min_area_ratio=min_area_ratio,
                        max_area_ratio=max_area_ratio, min_fragment_px=min_fragment_px)
    try:
        out_i, out_m, info = propagated_pairs(images, masks, support_volume, support_slices, n, seed,
                                              offsets=tuple(offsets), checks=checks)
    except PairError as err:
        raise PairError(f"{where}: {err}") from None
    used = refs(support_id, sorted({p["slice"] for p in info["pairs"]}))
    if appearance:
        donors = {v: volumes[v] for v in volumes if v != support_id}
        if not donors:
            raise PairError(f"{where}: appearance needs a training volume other than the support volume {support_id}")
        depth = len(support_volume) - 1
        out_i, picked = restyle_slices(out_i, [p["slice"] / max(depth, 1) for p in info["pairs"]], donors, seed)
        for p, (v, z) in zip(info["pairs"], picked):
            p["appearance_donor"] = [v, z]
        used += tuple(SliceRef(v, z) for v, z in sorted(set(picked)))
    provenance = Provenance(fold=fold, class_name=class_name, derived=used,
                            query_volumes=tuple(map(str, query_volumes)),
                            notes="label propagation: unlabelled slices of the support volume, no other label"
                            + ("; contrast of other training volumes' slices (images only)" if appearance else ""))
    manifest = {"generator": "propagated", "checkpoint": None, "checkpoint_sha256": None, "seed": seed, "n": n,
                "fold": fold, "class_name": class_name, "support": [dataclasses.asdict(r) for r in refs_],
                "training": provenance.to_dict(), "query_volumes": list(map(str, query_volumes)), "deform": None,
                "sampler": "tvl1", "steps": 0, "appearance": appearance,
                "source": [dataclasses.asdict(refs_[p["support"]]) for p in info["pairs"]],
                "dropped_fragments": [0] * len(refs_)}
    validate_manifest(manifest, query_volumes)
    manifest["checks"] = {"thresholds": info["checks"], "offsets": info["offsets"],
                          "n_candidates": info["n_candidates"], "n_passed": info["n_passed"],
                          "share_passed": info["share_passed"], "dropped": info["n_candidates"] - info["n_passed"],
                          "supports_without_pairs": info["supports_without_pairs"], "candidates": info["candidates"]}
    manifest["pairs"] = info["pairs"]
    return SyntheticSet(out_i.float(), out_m.float(), _jsonable(manifest))
