"""Pairs grounded in real anatomy: supports warped onto unlabelled subjects, and the oracle ceiling.

`learned_pairs` (Zhao et al. 2019): each support slice is registered onto every unlabelled volume
(`augment.registration`: the model finds the corresponding slice itself); the support image AND its
mask are warped by the same field, so the pair is consistent by construction (image bilinear, filled
with its minimum outside the field of view; mask bilinear, then > 0.5). Then another subject's appearance is applied (`augment.appearance`).
Every candidate passes label-free checks before use, recorded in `info["candidates"]`:
  - the field is smooth and invertible: share of pixels with Jacobian determinant <= 0 at most
    `max_folded_share`;
  - the registration similarity (mean squared LNCC with the target slice) is at least `min_similarity`;
  - the warped mask is plausible against its source (`augment.masks.mask_problem`): not empty, area
    ratio within [min_area_ratio, max_area_ratio], no more components (nor small ones) than the source.
A support all of whose candidates fail raises `PairError` in one line naming each failed pair (support
index -> volume id, slice, reason); failed candidates of a support that still has passing ones are
dropped and counted. `n` pairs cycle over the supports (pair k uses support k mod S) and each support
uses distinct passing targets, in a seeded random order, before reusing one.

`oracle_pairs` is the diagnostic ceiling that Setting 1 forbids: real training slices with their TRUE
labels, at the supports' relative positions in the class span. A pipeline must gate it behind
`diagnostic = true`; it is here as a pure function.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from monai.networks.blocks import Warp

from augment.appearance import HistogramAppearance
from augment.config import DeformConfig
from augment.masks import mask_problem
from augment.pairs import ArrayLike, PairError, as_pairs
from augment.registration import Registration, RegistrationModel, fit_z_map, folded_share, map_slice

EP1_POSITIONS = (1 / 6, 1 / 2, 5 / 6)


@dataclass(frozen=True)
class PairChecks:
    """Thresholds of the label-free checks (chosen on the phantom and the training volumes, never test Dice)."""
    max_folded_share: float = 0.005
    min_similarity: float = 0.15
    min_area_ratio: float = 0.5
    max_area_ratio: float = 2.0
    min_fragment_px: int = 12

    def mask_config(self) -> DeformConfig:
        return DeformConfig(min_area_ratio=self.min_area_ratio, max_area_ratio=self.max_area_ratio,
                            min_fragment_px=self.min_fragment_px)


def warp_pair(image: torch.Tensor, mask: torch.Tensor, ddf: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Warp `image` and `mask` `(H, W)` by one field `ddf` `(2, H, W)`: the pair stays consistent.

    Outside the support's field of view the image is filled with its minimum (MRI air), not smeared."""
    low = image.min()
    img = Warp(mode="bilinear", padding_mode="zeros")((image - low)[None, None], ddf[None])[0, 0] + low
    soft = Warp(mode="bilinear", padding_mode="zeros")(mask[None, None].float(), ddf[None])[0, 0]
    return img, (soft > 0.5).float()


def pair_problem(reg: Registration, warped_mask: torch.Tensor, source_mask: torch.Tensor, checks: PairChecks
                 ) -> tuple[str | None, dict]:
    """Why a candidate pair fails the label-free checks (None if it passes), and its measures."""
    folded = folded_share(reg.ddf)
    area_ratio = float(warped_mask.sum() / source_mask.sum())
    measures = {"similarity": round(reg.similarity, 4), "affine_similarity": round(reg.affine_similarity, 4),
                "folded_share": round(folded, 5), "area_ratio": round(area_ratio, 3)}
    if folded > checks.max_folded_share:
        return f"folded share {folded:.4f} > {checks.max_folded_share}", measures
    if reg.similarity < checks.min_similarity:
        return f"similarity {reg.similarity:.3f} < {checks.min_similarity}", measures
    problem = mask_problem(warped_mask.numpy().astype(np.uint8), source_mask.numpy().astype(np.uint8),
                           checks.mask_config())
    return (None if problem is None else f"warped mask {problem}"), measures


def _volumes(unlabelled_volumes: Mapping[str, ArrayLike]) -> dict[str, torch.Tensor]:
    if not isinstance(unlabelled_volumes, Mapping) or not unlabelled_volumes:
        raise PairError("unlabelled_volumes must be a non-empty mapping {volume id: (Z, H, W) array}")
    out = {}
    for vid, v in unlabelled_volumes.items():
        v = torch.as_tensor(np.asarray(v, np.float32))
        if v.ndim != 3 or not torch.isfinite(v).all():
            raise PairError(f"unlabelled volume {vid!r} must be a finite (Z, H, W) array, got shape {tuple(v.shape)}")
        out[str(vid)] = v
    return out


def register_candidates(support_images: torch.Tensor, support_masks: torch.Tensor, volumes: dict[str, torch.Tensor],
                        model: RegistrationModel, checks: PairChecks, *, z_maps: Mapping[str, dict] | None = None,
                        support_slices: Sequence[int] | None = None, z_window: int = 1) -> list[list[dict]]:
    """Every (support, volume) candidate: registration, warped pair, checks. One list per support.

    With `z_maps` {volume id: `fit_z_map` of the support volume onto it} and the supports' `support_slices`,
    each support searches only the slices within `z_window` of its mapped slice; without, every slice.
    """
    if (z_maps is None) != (support_slices is None):
        raise PairError("z_maps and support_slices go together: give both or neither")
    out = []
    for s in range(len(support_images)):
        rows = []
        for vid, vol in volumes.items():
            name = f"support {s} -> volume {vid!r}"
            slices = None if z_maps is None else map_slice(z_maps[vid], int(support_slices[s]), len(vol), z_window)
            reg = model.register(support_images[s, 0], vol, slices=slices, name=name)
            image, mask = warp_pair(support_images[s, 0], support_masks[s, 0], reg.ddf)
            problem, measures = pair_problem(reg, mask, support_masks[s, 0], checks)
            rows.append({"support": s, "volume": vid, "slice": reg.target_slice, "problem": problem,
                         **measures, "image": image, "mask": mask, "registration": reg})
        out.append(rows)
    return out


def fit_z_maps(support_volume: ArrayLike, volumes: Mapping[str, torch.Tensor], model: RegistrationModel
               ) -> dict[str, dict]:
    """`fit_z_map` of the support volume (images only) onto every unlabelled volume."""
    sv = torch.as_tensor(np.asarray(support_volume, np.float32))
    if sv.ndim != 3:
        raise PairError(f"support_volume must be (Z, H, W), got {tuple(sv.shape)}")
    model.check_size(*sv.shape[-2:], "the support volume")
    return {vid: fit_z_map(sv, vol, config=model.config) for vid, vol in volumes.items()}


def _public(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in ("image", "mask", "registration")}


def learned_pairs(support_images: ArrayLike, support_masks: ArrayLike, unlabelled_volumes: Mapping[str, ArrayLike],
                  model: RegistrationModel, appearance: HistogramAppearance | None, n: int, seed: int, *,
                  checks: PairChecks = PairChecks(), support_volume: ArrayLike | None = None,
                  support_slices: Sequence[int] | None = None, z_window: int = 1
                  ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """`n` pairs `(n, 1, H, W)` (images, masks) made by warping the supports onto unlabelled subjects.

    `unlabelled_volumes` {id: `(Z, H, W)`} are images only (the fold's training volumes). `appearance`
    None keeps the support's intensities. With `support_volume` `(Z, H, W)` (the support volume's image, no
    labels) and the supports' `support_slices`, the slice correspondence comes from one line z_t = a z_s + b
    fitted between whole volumes (`fit_z_map`), searched within `z_window`; without them, from the best
    slice of each volume. Returns images, masks and a JSON-able `info`: every candidate
    with its measures and verdict, the share that passed, and for each pair its support, target, slice
    and appearance donor. `register_candidates` + `select_pairs` are the same in two steps, for callers
    that also measure the candidates.
    """
    images, masks = as_pairs((support_images, support_masks), "support")
    model.check_size(*images.shape[-2:], "support pair 0")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    volumes = _volumes(unlabelled_volumes)
    z_maps = None
    if support_volume is not None or support_slices is not None:
        if support_volume is None or support_slices is None or len(support_slices) != len(images):
            raise PairError(f"support_volume and support_slices go together, one slice index per support "
                            f"({len(images)}), got {None if support_slices is None else list(support_slices)}")
        z_maps = fit_z_maps(support_volume, volumes, model)
    candidates = register_candidates(images, masks, volumes, model, checks, z_maps=z_maps,
                                     support_slices=support_slices, z_window=z_window)
    return select_pairs(candidates, volumes, appearance, n, seed, checks=checks)


def select_pairs(candidates: list[list[dict]], volumes: Mapping[str, torch.Tensor],
                 appearance: HistogramAppearance | None, n: int, seed: int, *, checks: PairChecks = PairChecks()
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Steps 2-3 of `learned_pairs`, from the output of `register_candidates`."""
    rng = np.random.default_rng(seed)
    passing = [[r for r in rows if r["problem"] is None] for rows in candidates]
    failed = [s for s, p in enumerate(passing) if not p]
    if len(failed) == len(candidates):
        reasons = "; ".join(f"support {r['support']} -> volume {r['volume']!r} slice {r['slice']}: {r['problem']}"
                            for s in failed for r in candidates[s])
        raise PairError(f"support(s) {failed}: every candidate pair failed the checks ({reasons})")
    # 2. n pairs cycling over the supports with a passing candidate, distinct targets first; a support
    # none of whose warps passes (e.g. an organ's tip that vanishes when warped) gives no pair
    used = [s for s in range(len(candidates)) if s not in failed]
    order = {s: list(rng.permutation(len(passing[s]))) for s in used}
    out_i, out_m, pairs = [], [], []
    for k in range(n):
        s = used[k % len(used)]
        row = passing[s][order[s][(k // len(used)) % len(passing[s])]]
        image, donor = row["image"], None
        # 3. another subject's appearance: a passing target of the same support, other than this one
        if appearance is not None:
            others = [r for r in passing[s] if r["volume"] != row["volume"]] or [row]
            donor = others[int(rng.integers(len(others)))]
            image = appearance.apply(image, row["mask"], volumes[donor["volume"]][donor["slice"]], donor["mask"])
        out_i.append(image)
        out_m.append(row["mask"])
        pairs.append({"support": s, "volume": row["volume"], "slice": row["slice"],
                      "similarity": row["similarity"], "folded_share": row["folded_share"],
                      "appearance_donor": None if donor is None else [donor["volume"], donor["slice"]]})
    n_cand = sum(len(rows) for rows in candidates)
    n_pass = sum(len(p) for p in passing)
    info = {"checks": asdict(checks), "n_candidates": n_cand, "n_passed": n_pass, "share_passed": n_pass / n_cand,
            "supports_without_pairs": failed, "pairs": pairs, "candidates": [_public(r) for rows in candidates for r in rows]}
    return torch.stack(out_i)[:, None], torch.stack(out_m)[:, None], info


def relative_slice(z0: int, z1: int, position: float) -> int:
    """The slice at relative `position` of the span [z0, z1]: z0 + floor(L p), L = z1 - z0 + 1 (EP1's rule
    for p = (2i + 1) / (2n); the small epsilon keeps 1/6 * 6 from flooring to 0.999...)."""
    return z0 + int(np.floor((z1 - z0 + 1) * position + 1e-9))


def oracle_pairs(train_volumes_images: Sequence[ArrayLike], train_volumes_labels_binary: Sequence[ArrayLike], n: int,
                 relative_positions: Sequence[float] = EP1_POSITIONS, seed: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """DIAGNOSTIC ONLY (Setting 1 forbids it): `n` real training slices `(n, 1, H, W)` with their true masks.

    Volumes are taken in a seeded random order; from each, the slices at `relative_positions` of its
    class span (pair k uses position k mod P). A volume without the class, or whose slice at one of the
    positions is empty (a gap in the span), is skipped and listed in `info["skipped"]`.
    """
    if len(train_volumes_images) != len(train_volumes_labels_binary):
        raise PairError(f"{len(train_volumes_images)} image volumes but {len(train_volumes_labels_binary)} label volumes")
    if not relative_positions or not all(0 <= p < 1 for p in relative_positions):
        raise PairError(f"relative_positions must be in [0, 1), got {list(relative_positions)}")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    rng = np.random.default_rng(seed)
    chosen, skipped = [], []
    for v in rng.permutation(len(train_volumes_images)):
        if len(chosen) >= n:
            break
        img, lab = np.asarray(train_volumes_images[v], np.float32), np.asarray(train_volumes_labels_binary[v]) > 0
        if img.shape != lab.shape or img.ndim != 3:
            raise PairError(f"volume {v}: image {img.shape} and labels {lab.shape} must be the same (Z, H, W)")
        zs = np.flatnonzero(lab.any(axis=(1, 2)))
        if not len(zs):
            skipped.append({"volume": int(v), "why": "class absent"})
            continue
        picks = [relative_slice(int(zs[0]), int(zs[-1]), p) for p in relative_positions]
        if not all(lab[z].any() for z in picks):
            skipped.append({"volume": int(v), "why": f"empty slice at one of {picks}"})
            continue
        chosen += [(int(v), z, img[z], lab[z]) for z in picks]
    if len(chosen) < n:
        raise PairError(f"oracle_pairs: only {len(chosen)} slices available from {len(train_volumes_images)} volumes "
                        f"at positions {list(relative_positions)}, {n} requested")
    chosen = chosen[:n]
    images = torch.from_numpy(np.stack([c[2] for c in chosen]))[:, None]
    masks = torch.from_numpy(np.stack([c[3] for c in chosen]).astype(np.float32))[:, None]
    return images, masks, {"pairs": [{"volume": v, "slice": z} for v, z, _, _ in chosen], "skipped": skipped}
