"""Synthesis and quality stages: `n` synthetic pairs of a class from one source, and how good they are."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from augment.manifest import refs
from augment.masks import DeformConfig
from augment.registry import CLASSICAL
from augment.training import CHECKPOINT_FILE
from pipelines.stages.base import Stage, StageEntry
from pipelines.stages.inputs import support_pairs
from segment.data.protocol import Fold
from segment.data.slices import PreparedData


@dataclass(frozen=True, kw_only=True)
class Synthesis(Stage):
    """`n` pairs of a class from `source`: deformed support masks, an image drawn for each by the fine-tuned
    `generator` (none for the classical source, which deforms image and mask together)."""

    name: ClassVar[str] = "synthesis"
    version: ClassVar[str] = "3"
    source: str
    class_name: str
    n: int
    seed: int
    data: PreparedData
    fold: Fold
    deform: DeformConfig = DeformConfig()
    generator: StageEntry | None = None
    sampling: dict[str, Any] = field(default_factory=dict)  # the generator's sampling keywords (registry)

    @property
    def label(self) -> str:
        return f"{self.source} fold{self.fold.index} s{self.seed} {self.class_name}"

    def produce(self, folder: Path) -> None:
        from augment.synthesis import classical_set, save_set, synthesize
        images, masks, idx = support_pairs(self.data, self.fold, self.class_name)
        ids = refs(self.fold.support, idx)
        if self.source == CLASSICAL:
            syn = classical_set(images, masks, ids, n=self.n, seed=self.seed, deform=self.deform,
                                fold=self.fold.index, class_name=self.class_name, query_volumes=self.fold.queries)
        else:
            syn = synthesize(self.generator.path / CHECKPOINT_FILE, images, masks, ids, n=self.n, seed=self.seed,
                             deform=self.deform, query_volumes=self.fold.queries, **self.sampling)
        save_set(syn, folder / "set")


@dataclass(frozen=True, kw_only=True)
class Quality(Stage):
    """Why pairs help or not: does the real-data segmenter find the intended mask on them (mask
    consistency), do organ intensities match the real supports, and are they copies of the supports?"""

    name: ClassVar[str] = "quality"
    version: ClassVar[str] = "3"
    source: str
    class_name: str
    seed: int
    data: PreparedData
    fold: Fold
    synthesis: StageEntry
    base: StageEntry  # the base segmenter that judges mask consistency

    @property
    def label(self) -> str:
        return f"{self.source} fold{self.fold.index} s{self.seed} {self.class_name}"

    def produce(self, folder: Path) -> None:
        from augment.quality import intensity_histogram_distance, mask_consistency, nearest_neighbour_distance
        from augment.synthesis import load_set
        from segment import train as seg_train
        from segment.predict import make_predictor
        real_i, real_m, _ = support_pairs(self.data, self.fold, self.class_name)
        syn = load_set(self.synthesis.path / "set")
        consistency = mask_consistency(make_predictor(seg_train.load(self.base.path / "model.pt")), real_i, real_m,
                                       syn.images, syn.masks)
        quality = {"source": self.source, "class": self.class_name, "fold": self.fold.index, "seed": self.seed,
                   "n": len(syn), "mask_consistency": consistency["mean_dice"], "per_pair": consistency["per_pair"],
                   "histogram_distance": intensity_histogram_distance(real_i, syn.images, real_masks=real_m,
                                                                      synthetic_masks=syn.masks),
                   "nn_distance_to_supports": nearest_neighbour_distance(real_i, syn.images)["mean"]}
        (folder / "quality.json").write_text(json.dumps(quality, indent=2))
