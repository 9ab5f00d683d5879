"""What several stages read from the prepared data: the protocol's support pairs of a class, the classes
training may not use, and an arm's synthetic pairs (optionally filtered by mask consistency)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipelines.stages.base import StageEntry
from segment.data.protocol import Fold, excluded_class_ids
from segment.data.protocol import support_pairs as protocol_support_pairs
from segment.data.slices import PreparedData

if TYPE_CHECKING:  # torch loads inside the functions, so a fully cached run never imports it
    import torch


def exclusion_sets(data: PreparedData, classes: tuple[str, ...], setting: int, *,
                   supervised: bool) -> dict[str, tuple[int, ...]]:
    """Class -> the class ids training may not use as labels. Setting 1 pools every evaluated class, so
    one model per fold serves them all; Setting 2 keeps one set per exclusion group (the OR rule), and so
    does Setting 1 when training reads `supervised` episodes: each group's model learns from the labels
    of the other groups' classes, as in the few-shot benchmark."""
    if setting == 1 and not supervised:
        pooled = tuple(sorted({i for c in classes for i in excluded_class_ids(data.spec, c, 1)}))
        return {c: pooled for c in classes}
    return {c: tuple(sorted(excluded_class_ids(data.spec, c, 2))) for c in classes}


def support_pairs(data: PreparedData, fold: Fold, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The protocol's support pairs of a class: its EP1 slices of the fold's support volume, (3, 1, R, R)."""
    import torch

    images, masks, idx = protocol_support_pairs(data.volume(fold.support), data.spec.class_id(name), "EP1")
    return torch.from_numpy(images), torch.from_numpy(masks), idx


def synthetic_pairs(data: PreparedData, fold: Fold, class_name: str, sets: tuple[StageEntry, ...], *,
                    base_model: StageEntry | None, min_dice: float,
                    limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The synthetic pairs of a class from synthesis entries `sets`, (N, 1, R, R) each, at most `limit` per set.

    With `min_dice` > 0, only pairs on which the base segmenter, given the real supports alone, recovers the
    intended mask with at least that Dice are kept (the mask-consistency filter of the literature).
    """
    import torch

    from augment.quality import mask_consistency
    from augment.synthesis import load_set
    from segment import train as seg_train
    from segment.predict import make_predictor
    loaded = [load_set(entry.path / "set") for entry in sets]
    if not loaded:
        return torch.empty(0, 1, data.resolution, data.resolution), torch.empty(0, 1, data.resolution, data.resolution)
    images = torch.cat([syn.images[:limit] for syn in loaded])  # (N, 1, R, R)
    masks = torch.cat([syn.masks[:limit] for syn in loaded])
    if min_dice > 0 and base_model is not None:
        real_i, real_m, _ = support_pairs(data, fold, class_name)
        scores = mask_consistency(make_predictor(seg_train.load(base_model.path / "model.pt")), real_i, real_m,
                                  images, masks)
        keep = torch.tensor([d >= min_dice for d in scores["per_pair"]])
        images, masks = images[keep], masks[keep]
    return images, masks
