"""The registered source: real slices of OTHER subjects with a support mask carried there by registration, kept
only where the segmenter agrees (`make_set` for `augment.registry`, then `relabel`).

The propagated source gains because its images are real anatomy with nearly right masks, and falls short of
the oracle because they are one subject's slices. The learned source reaches other subjects but keeps the
support's texture, and its masks are only 38-46 % right on the target slices. This source pairs the target
slices' own images with those masks, then needs a better mask: the pipeline predicts one with the segmenter
(the baseline arm's model, given the real supports) and `relabel` keeps the prediction only where it agrees
with the registered mask (Dice >= `min_agreement`). Where two estimates agree, both are more likely right,
but they share some errors (on CHAOS the kept masks are 80 % right, against 66 % before the filter). No label
of the training volumes is read; their labels only measure this (`benchmarks/augment_registered.py`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from augment.learned import _load, registration_manifest
from augment.manifest import SliceRef
from augment.pairs import PairError
from augment.synthesis import SyntheticSet, _jsonable, _support_refs
from augment.warped_pairs import PairChecks, fit_z_maps, register_candidates


def make_set(checkpoint: Path | None, *, support: tuple[torch.Tensor, torch.Tensor, Sequence[SliceRef]],
             support_volume: np.ndarray, support_slices: Sequence[int], volumes: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray] | None, n: int, seed: int, fold: int, class_name: str,
             query_volumes: Sequence[str], z_window: int, max_folded_share: float, min_similarity: float,
             min_area_ratio: float, max_area_ratio: float, min_fragment_px: int) -> SyntheticSet:
    """Every candidate of a class that passes the label-free checks: a target slice `(1, R, R)` of an unlabelled
    volume with the support mask warped onto it by the learned model at `checkpoint`. `n` is what `relabel` will
    keep at most, recorded here. A model at another resolution, or no support with a passing candidate, raises
    `PairError` in one line naming the pairs."""
    if labels is not None:
        raise PairError("the registered source reads no label of the training volumes; pass labels=None")
    images, masks, ids = support
    refs_ = _support_refs(ids, len(images))
    where = f"registered pairs, fold {fold}, class {class_name}"
    model, ckpt = _load(checkpoint, images.shape[-1], where)
    vols = {str(k): torch.as_tensor(np.asarray(v, np.float32)) for k, v in volumes.items()}
    manifest = registration_manifest("registered", ckpt, refs_, vols, n=n, seed=seed, fold=fold,
                                     class_name=class_name, query_volumes=query_volumes, described="registered")
    checks = PairChecks(max_folded_share=max_folded_share, min_similarity=min_similarity,
                        min_area_ratio=min_area_ratio, max_area_ratio=max_area_ratio, min_fragment_px=min_fragment_px)
    try:
        model.check_size(*images.shape[-2:], "support pair 0")
        z_maps = fit_z_maps(support_volume, vols, model)
        candidates = register_candidates(images, masks, vols, model, checks, z_maps=z_maps,
                                         support_slices=list(support_slices), z_window=z_window)
    except PairError as err:
        raise PairError(f"{where}: {err}") from None
    passing = [r for rows in candidates for r in rows if r["problem"] is None]
    if not passing:
        reasons = "; ".join(f"support {r['support']} -> volume {r['volume']!r} slice {r['slice']}: {r['problem']}"
                            for rows in candidates for r in rows)
        raise PairError(f"{where}: every candidate pair failed the checks ({reasons})")
    # 1. the target slice's own image (real anatomy and texture), the support mask warped onto it
    out_i = torch.stack([vols[r["volume"]][r["slice"]] for r in passing])[:, None]   # (P, 1, R, R)
    out_m = torch.stack([r["mask"] for r in passing])[:, None]
    manifest["source"] = [dataclasses.asdict(refs_[r["support"]]) for r in passing]
    manifest["dropped_fragments"] = [0] * len(refs_)
    n_cand = sum(len(rows) for rows in candidates)
    manifest["checks"] = {"thresholds": dataclasses.asdict(checks), "n_candidates": n_cand, "n_passed": len(passing),
                          "share_passed": len(passing) / n_cand, "dropped": n_cand - len(passing)}
    manifest["pairs"] = [{"support": r["support"], "volume": r["volume"], "slice": r["slice"],
                          "similarity": r["similarity"], "folded_share": r["folded_share"]} for r in passing]
    return SyntheticSet(out_i.float(), out_m.float(), _jsonable(manifest))


def agreement(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Dice of binary masks `(N, 1, H, W)` pair by pair, `(N,)`; two empty masks agree fully."""
    a, b = a.flatten(1) > 0.5, b.flatten(1) > 0.5
    total = (a.sum(1) + b.sum(1)).float()
    both = 2 * (a & b).sum(1).float()
    return torch.where(total > 0, both / total.clamp(min=1), torch.ones_like(total))


def relabel(pairs: SyntheticSet, predicted: torch.Tensor, *, min_agreement: float, n: int, teacher: str
            ) -> SyntheticSet:
    """The `n` pairs (at most) whose `predicted` mask `(N, 1, H, W)` (the segmenter's, thresholded) agrees best
    with the registered one, each at least `min_agreement` (Dice); their masks become the prediction. May be
    empty. `teacher` names the model in the manifest."""
    if predicted.shape != pairs.masks.shape:
        raise PairError(f"relabel: {tuple(predicted.shape)} predicted masks for {tuple(pairs.masks.shape)} pairs")
    if not 0 < min_agreement <= 1 or n < 1:
        raise PairError(f"relabel: min_agreement must be in (0, 1] and n >= 1, got {min_agreement} and {n}")
    predicted = (predicted > 0.5).float()
    score = agreement(predicted, pairs.masks)
    ok = (score >= min_agreement) & (predicted.flatten(1).sum(1) > 0)
    order = [int(i) for i in torch.argsort(-score) if ok[i]][:n]                # best agreement first
    manifest = dict(pairs.manifest)
    manifest["relabelled"] = {"teacher": teacher, "min_agreement": min_agreement, "n_candidates": len(pairs),
                              "n_agreeing": int(ok.sum()), "kept": order,
                              "agreement": [round(float(d), 4) for d in score]}
    manifest["source"] = [pairs.manifest["source"][i] for i in order]
    manifest["pairs"] = [pairs.manifest["pairs"][i] | {"agreement": round(float(score[i]), 4)} for i in order]
    index = torch.tensor(order, dtype=torch.long)
    return SyntheticSet(pairs.images[index], predicted[index], _jsonable(manifest))
