"""The few-shot evaluation protocol of the field, every rule in this one module.

Folds (Roy et al. 2020; Ouyang et al. 2020). Volumes are sorted by id, numerically. With N volumes and
F folds the stride is s = N // F, and fold k tests the s + 1 positions k*s .. k*s + s, wrapping around:
on Abd-MRI (N = 20, F = 5) fold 0 is positions 0..4 and fold 4 is 16..19 and 0. The last test volume
of a fold is its labelled support volume (SSL-ALPNet's `support_idx = -1`); the other test volumes are
the queries. Every volume outside the fold is a training volume.

Settings. Setting 1: the test class is never used as a label in training (its voxels are relabelled
background with `mask_out_classes`), but its slices stay in the training images. Setting 2: every
training slice that contains ANY class of the test class's group is removed (OR rule; groups come from
the dataset spec, e.g. upper abdomen {liver, spleen}, lower abdomen {left, right kidney}). Several public
descendants drop a slice only when it holds ALL excluded classes, which inflates Setting 2 scores; this
module implements the OR rule on purpose.

Class ranges. Every slice range below (support span, query span) comes from the labels as loaded, at
their native in-plane size, never from the down-sampled working labels: a structure that only a few
native pixels show in an end slice is inside its span.

EP1 (Roy et al. 2020; Ouyang et al. 2020). In the support volume, the slices that hold the class span
[z0, z1], length L = z1 - z0 + 1. It is cut into n = 3 chunks and chunk i's support slice is
z0 + floor(L * (2i + 1) / (2n)), i.e. relative positions 1/6, 1/2, 5/6. Each query volume's class span
[zmin, zmax] (from the query label) is cut as SSL-ALPNet's test loader does: slice z belongs to chunk
min((z - zmin) // ((zmax - zmin) / n), n - 1), in floating point, so leftover slices go to the LAST
chunk; a one-slice span is chunk 0. Every slice of chunk i is segmented with support slice i. "1-shot"
thus means one labelled volume, three annotated slices.

EP2 (Hansen et al. 2022). The middle support slice (relative position 1/2, as above with n = 1)
segments EVERY slice of each query volume; no query label picks slices.

What a predictor sees and returns. Predictors get working-resolution slices: support images and masks
(the working labels of the support slices) and query images, each (n, 1, R, R). They return the query
foreground, probabilities or {0, 1}, either at the working size (Q, 1, R, R) or at the query label
file's native in-plane size (Q, 1, H0, W0). The evaluator brings it to the scoring grid only when the
sizes differ: working -> native by bilinear interpolation of the probabilities (align_corners=False),
native -> working by nearest-exact sampling (the rule the working labels were made with); then it
thresholds at p > 0.5. A predictor that knows the native truth (the oracle) can thus be exact.

Dice. Scored on `dice_grid` = "native" (default: the label file's grid, as published numbers are) or
"working". Per query volume in 3D: 2 TP / (2 TP + FP + FN) summed over all slices of the volume (for
EP1 the slices outside the query span are predicted empty). Two figures per query volume: `dice`, the
headline, is the thresholded prediction as it is (no post-processing, as SSL-ALPNet reports);
`dice_post` first keeps the largest 26-connected 3D component of the whole assembled query prediction,
once per query volume. Means: over query volumes within a fold, then over folds, per class; the overall
mean is over classes. A query volume in which the class is absent is skipped and listed under
"skipped". EP1 and EP2 results are never merged: each `evaluate` call scores one protocol.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from typing import TYPE_CHECKING

import numpy as np

from segment.config import GRIDS, PROTOCOLS, SCORE_ON, SETTINGS  # defined torch-free so configs validate without torch
from segment.data.slices import PreparedData, Volume
from segment.data.volumes import DataError, DatasetSpec

if TYPE_CHECKING:  # torch and scipy load where scores are computed, so folds come without them
    import torch

# (support images (S, 1, R, R), support masks (S, 1, R, R) in {0, 1}, query images (Q, 1, R, R))
#   -> query foreground (Q, 1, R, R) or (Q, 1, H0, W0), probabilities or {0, 1}; thresholded at 0.5.
Predictor = Callable[["torch.Tensor", "torch.Tensor", "torch.Tensor"], "torch.Tensor"]
# called as on_prediction(fold index, class name, query id, slice indices (n,), masks (n, H, W) bool on
# the scoring grid, before post-processing)
PredictionHook = Callable[[int, str, str, np.ndarray, np.ndarray], None]


@dataclass(frozen=True)
class Fold:
    index: int
    support: str
    queries: tuple[str, ...]
    train: tuple[str, ...]


def make_folds(volume_ids: list[str] | tuple[str, ...], n_folds: int) -> list[Fold]:
    """The F folds over volumes already sorted by id (see the module docstring)."""
    n = len(volume_ids)
    if n_folds < 1 or n < max(2, n_folds):
        raise DataError(f"{n} volume(s) cannot form {n_folds} folds: need at least max(2, folds) volumes")
    stride = n // n_folds
    folds = []
    for k in range(n_folds):
        test = [volume_ids[(k * stride + j) % n] for j in range(min(stride + 1, n))]
        train = tuple(v for v in volume_ids if v not in test)
        folds.append(Fold(k, support=test[-1], queries=tuple(test[:-1]), train=train))
    return folds


def scored_fold(fold: Fold, score_on: str) -> Fold:
    """The fold whose `queries` are scored: itself, or for a validation run its training volumes (same
    support volume), so that settings are chosen without the query volumes' Dice."""
    if score_on not in SCORE_ON:
        raise DataError(f"score_on must be one of {SCORE_ON}, got {score_on!r}")
    return fold if score_on == "queries" else Fold(fold.index, support=fold.support, queries=fold.train,
                                                   train=fold.train)


def excluded_class_ids(spec: DatasetSpec, test_class: str, setting: int) -> tuple[int, ...]:
    """Class ids whose labels training may not use: the test class (Setting 1) or its group (Setting 2)."""
    if setting not in SETTINGS:
        raise DataError(f"setting must be one of {SETTINGS}, got {setting!r}")
    names = (test_class,) if setting == 1 else spec.group_of(test_class)
    return tuple(spec.class_id(name) for name in names)


def training_slice_mask(labels: np.ndarray, excluded: tuple[int, ...], setting: int) -> np.ndarray:
    """(Z,) bool: which slices of a training volume (Z, H, W) may be used. Setting 2 uses the OR rule."""
    if setting not in SETTINGS:
        raise DataError(f"setting must be one of {SETTINGS}, got {setting!r}")
    if setting == 1 or not excluded:
        return np.ones(len(labels), dtype=bool)
    holds_any = np.isin(labels, excluded).any(axis=(1, 2))  # (Z,)
    return ~holds_any


def mask_out_classes(labels: np.ndarray, excluded: tuple[int, ...]) -> np.ndarray:
    """Labels with the excluded classes turned into background, so training never sees them as labels."""
    return np.where(np.isin(labels, excluded), 0, labels).astype(labels.dtype)


def _class_span(labels: np.ndarray, class_id: int) -> tuple[int, int] | None:
    zs = np.flatnonzero((labels == class_id).any(axis=(1, 2)))
    return (int(zs[0]), int(zs[-1])) if len(zs) else None


def ep1_support_indices(labels: np.ndarray, class_id: int, n_chunks: int = 3) -> list[int]:
    """Support slice of each chunk of the class span: z0 + floor(L (2i + 1) / (2n)). Pass native labels."""
    span = _class_span(labels, class_id)
    if span is None:
        raise DataError(f"class id {class_id} is absent from the support volume")
    z0, z1 = span
    length = z1 - z0 + 1
    return [z0 + (length * (2 * i + 1)) // (2 * n_chunks) for i in range(n_chunks)]


def support_slices(support: Volume, class_id: int, protocol: str, n_chunks: int = 3) -> list[int]:
    """The labelled support slices a protocol gives for a class: one per EP1 chunk, or EP2's middle slice.

    They are the only labels of the novel class a method may use at test time (e.g. to fine-tune on).
    """
    return ep1_support_indices(support.native_labels, class_id, n_chunks if protocol == "EP1" else 1)


def support_pairs(support: Volume, class_id: int, protocol: str) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """The `support_slices` of a class as working-resolution pairs: images and {0, 1} masks `(S, 1, R, R)`
    float32, and their slice indices."""
    idx = support_slices(support, class_id, protocol)
    masks = (support.labels[idx] == class_id)[:, None].astype(np.float32)
    return support.images[idx][:, None].astype(np.float32), masks, idx


def ep1_chunk_of(z: int, zmin: int, zmax: int, n_chunks: int = 3) -> int:
    """SSL-ALPNet's query chunk of slice z: min((z - zmin) // ((zmax - zmin) / n), n - 1); 0 for one slice."""
    if zmax == zmin:
        return 0
    return min(int((z - zmin) // ((zmax - zmin) / n_chunks)), n_chunks - 1)


def ep1_query_chunks(labels: np.ndarray, class_id: int, n_chunks: int = 3) -> list[np.ndarray]:
    """Slice indices of each chunk of the query's class span (see `ep1_chunk_of`). Pass native labels."""
    span = _class_span(labels, class_id)
    if span is None:
        return []
    zs = np.arange(span[0], span[1] + 1)
    chunk_of = np.array([ep1_chunk_of(int(z), *span, n_chunks) for z in zs])
    return [zs[chunk_of == i] for i in range(n_chunks)]


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """3D Dice 2TP / (2TP + FP + FN) of two boolean volumes; 1.0 when both are empty."""
    tp = np.logical_and(pred, truth).sum()
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2.0 * tp / denom)


def largest_component(masks: np.ndarray) -> np.ndarray:
    """(Z, H, W) bool -> the largest 26-connected 3D component (empty stays empty)."""
    from scipy import ndimage

    labels, n = ndimage.label(masks, structure=np.ones((3, 3, 3), dtype=bool))
    if n <= 1:
        return masks
    sizes = ndimage.sum_labels(masks, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def _as_batch(slices: np.ndarray) -> torch.Tensor:
    import torch

    return torch.from_numpy(np.ascontiguousarray(slices, dtype=np.float32))[:, None]  # (n, 1, R, R)


def _on_grid(out: torch.Tensor, grid_shape: tuple[int, int], *, from_working: bool) -> torch.Tensor:
    """(Q, 1, h, w) probabilities -> (Q, 1, *grid_shape): bilinear from the working grid, nearest-exact
    from the native one (the rule the working labels were made with); untouched when already there."""
    import torch.nn.functional as F

    if tuple(out.shape[-2:]) == tuple(grid_shape):
        return out
    if from_working:
        return F.interpolate(out, size=tuple(grid_shape), mode="bilinear", align_corners=False)
    return F.interpolate(out, size=tuple(grid_shape), mode="nearest-exact")


def _predict(predictor: Predictor, sup_img: np.ndarray, sup_mask: np.ndarray, qry: np.ndarray,
             native_shape: tuple[int, int], grid_shape: tuple[int, int]) -> np.ndarray:
    """Run the predictor on one task and return (Q, *grid_shape) bool, checking what it returned."""
    import torch

    out = predictor(_as_batch(sup_img), _as_batch(sup_mask), _as_batch(qry))
    out = out.detach().float().cpu() if isinstance(out, torch.Tensor) else torch.as_tensor(out, dtype=torch.float32)
    working = (len(qry), 1, *qry.shape[1:])
    native = (len(qry), 1, *native_shape)
    if tuple(out.shape) not in (working, native):
        raise ValueError(f"predictor returned shape {tuple(out.shape)}, expected {working} (Q, 1, R, R) at the "
                         f"working size or {native} (Q, 1, H0, W0) at the label file's size")
    on_grid = _on_grid(out, grid_shape, from_working=tuple(out.shape) == working)
    return on_grid[:, 0].numpy() > 0.5  # (Q, H, W)


def _tasks(protocol: str, support: Volume, query: Volume, class_id: int, n_chunks: int):
    """(support slice indices, query slice indices) pairs of one query volume; ranges from native labels."""
    sup_idx = support_slices(support, class_id, protocol, n_chunks)
    if protocol == "EP1":
        chunks = ep1_query_chunks(query.native_labels, class_id, n_chunks)
        return [([s], chunk) for s, chunk in zip(sup_idx, chunks) if len(chunk)]
    return [(sup_idx, np.arange(len(query.images)))]


def _score_query(run: Predictor, support: Volume, query: Volume, cid: int, protocol: str, n_chunks: int,
                 grid: str) -> tuple[np.ndarray, np.ndarray]:
    """The assembled prediction of one query volume and its truth, both (Z, H, W) bool on the scoring grid."""
    truth = (query.native_labels if grid == "native" else query.labels) == cid
    pred = np.zeros_like(truth)
    native_shape = tuple(query.native_labels.shape[1:])
    for sup_idx, q_idx in _tasks(protocol, support, query, cid, n_chunks):
        sup_mask = (support.labels[sup_idx] == cid).astype(np.float32)
        pred[q_idx] = _predict(run, support.images[sup_idx], sup_mask, query.images[q_idx], native_shape,
                               truth.shape[1:])
    return pred, truth


def evaluate(predictor: Predictor | None, data: PreparedData, folds: list[Fold], *, classes: list[str] | tuple[str, ...],
             protocol: str = "EP1", n_chunks: int = 3, dice_grid: str = "native",
             on_prediction: PredictionHook | None = None,
             predictor_for_fold: Callable[[Fold, str], Predictor] | None = None) -> dict:
    """Score a predictor under EP1 or EP2: Dice (`dice`, and `dice_post` after the per-volume largest
    component) per class per query volume per fold, plus the means, on `dice_grid` (module docstring).

    `predictor_for_fold(fold, class_name)`, when given, supplies a predictor per fold and class (a model
    trained for that fold); otherwise `predictor` serves every task.
    """
    from tqdm import tqdm

    if protocol not in PROTOCOLS:
        raise DataError(f"protocol must be one of {PROTOCOLS}, got {protocol!r}")
    if dice_grid not in GRIDS:
        raise DataError(f"dice_grid must be one of {GRIDS}, got {dice_grid!r}")
    if predictor is None and predictor_for_fold is None:
        raise ValueError("evaluate needs a predictor or a predictor_for_fold")
    for name in classes:
        data.spec.class_id(name)
    fold_rows, skipped = [], []
    tasks = [(f, c) for f in folds for c in classes]
    for fold, name in tqdm(tasks, desc=f"evaluate {protocol}", unit="task", leave=False):
        cid = data.spec.class_id(name)
        support = data.volume(fold.support)
        if not (support.native_labels == cid).any():
            raise DataError(f"{data.label_file(fold.support)}: class {name!r} is absent from the support volume "
                            f"of fold {fold.index}; choose another support or drop the class")
        run = predictor_for_fold(fold, name) if predictor_for_fold else predictor
        row = next((r for r in fold_rows if r["fold"] == fold.index), None)
        if row is None:
            row = {"fold": fold.index, "support": fold.support, "queries": list(fold.queries),
                   "support_slices": {}, "dice": {}, "dice_post": {}}
            fold_rows.append(row)
        row["support_slices"][name] = support_slices(support, cid, protocol, n_chunks)
        row["dice"][name], row["dice_post"][name] = {}, {}
        for qid in fold.queries:
            query = data.volume(qid)
            if not (query.native_labels == cid).any():
                skipped.append({"fold": fold.index, "class": name, "query": qid, "why": "class absent"})
                continue
            pred, truth = _score_query(run, support, query, cid, protocol, n_chunks, dice_grid)
            if on_prediction:
                zs = np.flatnonzero(truth.any(axis=(1, 2)) | pred.any(axis=(1, 2)))
                on_prediction(fold.index, name, qid, zs, pred[zs])
            row["dice"][name][qid] = dice(pred, truth)
            row["dice_post"][name][qid] = dice(largest_component(pred), truth)
    return _summarise(fold_rows, skipped, data, classes, protocol, dice_grid)


def _means(fold_rows: list[dict], key: str, classes) -> tuple[dict, dict, float]:
    """Per fold (mean over queries), per class (mean over folds) and overall (mean over classes)."""
    per_fold = {row["fold"]: {c: float(np.mean(list(d.values()))) for c, d in row[key].items() if d}
                for row in fold_rows}
    per_class = {c: float(np.mean([f[c] for f in per_fold.values() if c in f])) for c in classes
                 if any(c in f for f in per_fold.values())}
    return per_fold, per_class, float(np.mean(list(per_class.values()))) if per_class else float("nan")


def _summarise(fold_rows: list[dict], skipped: list[dict], data: PreparedData, classes, protocol: str,
               grid: str) -> dict:
    per_fold, per_class, mean = _means(fold_rows, "dice", classes)
    per_fold_post, per_class_post, mean_post = _means(fold_rows, "dice_post", classes)
    return {"protocol": protocol, "dataset": data.spec.name, "resolution": data.resolution, "dice_grid": grid,
            "postprocess": False, "classes": list(classes), "folds": fold_rows,
            "per_fold": per_fold, "per_class": per_class, "mean": mean,
            "per_fold_post": per_fold_post, "per_class_post": per_class_post, "mean_post": mean_post,
            "skipped": skipped}


def empty_predictor(support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor) -> torch.Tensor:
    """Predicts background everywhere: the floor every method must beat (Dice 0)."""
    import torch

    return torch.zeros_like(query_images)


def oracle_predictor(data: PreparedData) -> Predictor:
    """Returns each query slice's own label at native size: the ceiling (Dice 1 on either grid) that proves
    the evaluator's bookkeeping, resampling included.

    It sees only what any predictor sees. It finds each slice in `data` by its bytes, and the class from
    which working label of the support slice equals the support mask; it answers (Q, 1, H0, W0).
    """
    index = {}
    for v in data.volumes:
        for z in range(len(v.images)):
            index[v.images[z].tobytes()] = (v.labels[z], v.native_labels[z])

    def predict(support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor) -> torch.Tensor:
        sup_labels = index[support_images[0, 0].numpy().tobytes()][0]
        sup_mask = support_masks[0, 0].numpy() > 0.5
        cid = next(c for c in np.unique(sup_labels[sup_mask]) if np.array_equal(sup_labels == c, sup_mask))
        out = [index[q[0].numpy().tobytes()][1] == cid for q in query_images]
        import torch

        return torch.from_numpy(np.stack(out).astype(np.float32))[:, None]

    return predict
