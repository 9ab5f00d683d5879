"""The evaluate stage: one (model, arm) scored under one protocol on its fold's `queries` (a fold's query
volumes, or for a validation run its training volumes: `segment.data.protocol.scored_fold`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np

from pipelines.stages.base import Stage, StageEntry
from pipelines.stages.inputs import synthetic_pairs
from segment.data.protocol import Fold, evaluate
from segment.data.slices import PreparedData


def _to_shape(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool -> `shape` by nearest-exact sampling, the rule the working labels were made with."""
    if mask.shape == tuple(shape):
        return mask
    import torch

    x = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="nearest-exact")[0, 0].numpy() > 0.5


def _overlay_hook(keep: list[dict], n_slices: int, wanted_query: dict[str, str], data: PreparedData):
    """Keep a few query slices (image, truth, prediction) of one query volume per class for the report.

    The prediction comes on the scoring grid (native by default); truth and prediction are drawn on the
    working image, so both are brought to its size.
    """

    def hook(fold_index: int, class_name: str, query_id: str, zs: np.ndarray, pred: np.ndarray) -> None:
        if wanted_query.setdefault(class_name, query_id) != query_id:
            return
        vol, cid = data.volume(query_id), data.spec.class_id(class_name)
        truth = vol.native_labels if pred.shape[1:] == vol.native_labels.shape[1:] else vol.labels
        with_truth = [i for i, z in enumerate(zs) if (truth[z] == cid).any()]
        shape = vol.images.shape[1:]
        for i in with_truth[len(with_truth) // 2:][:n_slices]:
            keep.append({"class": class_name, "query": query_id, "slice": int(zs[i]), "image": vol.images[zs[i]],
                         "truth": _to_shape(truth[zs[i]] == cid, shape), "pred": _to_shape(pred[i], shape)})

    return hook


@dataclass(frozen=True, kw_only=True)
class Evaluate(Stage):
    """Score one (model, arm) under one protocol; extra test-time supports come from the arm's pairs.

    Rows carry the arm's name and role, `dice` (native label grid, no post-processing: the headline) and
    `dice_post` (the same prediction after the largest 3D component of each query volume); see
    `segment.data.protocol`. Arms with identical settings but different names have entries of their own.
    """

    name: ClassVar[str] = "evaluate"
    version: ClassVar[str] = "3"
    model: str
    arm: str
    role: str
    protocol: str
    classes: tuple[str, ...]
    seed: int
    data: PreparedData
    fold: Fold
    tuned: dict[str, StageEntry]  # class -> the fine-tuned (or base) segmenter
    test_supports: dict[str, tuple[StageEntry, ...]] = field(default_factory=dict)  # class -> sets added at test
    bases: dict[str, StageEntry] = field(default_factory=dict)  # class -> base segmenter of the pair filter
    max_test_supports: int = 0
    filter_dice: float = 0.0
    dice_grid: str = "native"
    overlays: int = 1

    @property
    def label(self) -> str:
        return f"{self.model} {self.arm} {self.protocol} fold{self.fold.index} s{self.seed}"

    def predictor_for(self, fold: Fold, class_name: str):
        from segment import train as seg_train
        from segment.predict import make_predictor
        net = seg_train.load(self.tuned[class_name].path / "model.pt")
        extra = None
        if self.test_supports:  # the protocol passes the real support slices itself
            extra = synthetic_pairs(self.data, fold, class_name, self.test_supports[class_name],
                                    limit=self.max_test_supports, base_model=self.bases.get(class_name),
                                    min_dice=self.filter_dice)
            extra = extra if len(extra[0]) else None
        return make_predictor(net, extra_supports=extra)  # probabilities; the evaluator post-processes

    def produce(self, folder: Path) -> None:
        panels: list[dict] = []
        res = evaluate(None, self.data, [self.fold], classes=self.classes, protocol=self.protocol,
                       predictor_for_fold=self.predictor_for, dice_grid=self.dice_grid,
                       on_prediction=_overlay_hook(panels, self.overlays, {}, self.data))
        rows = [{"protocol": self.protocol, "model": self.model, "arm": self.arm, "role": self.role, "class": c,
                 "fold": self.fold.index, "seed": self.seed, "query": q, "dice": d, "dice_post": row["dice_post"][c][q]}
                for row in res["folds"] for c, per_q in row["dice"].items() for q, d in per_q.items()]
        (folder / "rows.json").write_text(json.dumps({"rows": rows, "skipped": res["skipped"],
                                                      "dice_grid": self.dice_grid, "postprocess": False}, indent=2))
        np.savez_compressed(folder / "overlays.npz", **{f"{k}_{i}": np.asarray(p[k]) for i, p in enumerate(panels)
                                                         for k in ("image", "truth", "pred")})
        (folder / "overlays.json").write_text(json.dumps([{k: p[k] for k in ("class", "query", "slice")}
                                                          for p in panels]))


@dataclass(frozen=True)
class EvalRef:
    """Where one evaluate entry came from, for the report: its (model, arm, protocol, fold, seed)."""

    model: str
    arm: str
    protocol: str
    fold: int
    seed: int
    entry: StageEntry
