"""Synthesis and quality stages: `n` synthetic pairs of a class from one source (or another source's pairs
refined, e.g. by SDEdit), and how good they are."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from augment.manifest import refs
from augment.config import DeformConfig
from augment.registry import CHECKPOINT_FILE, CLASSICAL, VOLUME_SOURCES, refiner, volume_source
from pipelines.stages.base import Stage, StageEntry, context
from pipelines.stages.inputs import support_pairs
from segment.data.protocol import Fold
from segment.data.slices import PreparedData
from segment.data.volumes import DataError


@dataclass(frozen=True, kw_only=True)
class Synthesis(Stage):
    """`n` pairs of a class from `source`: deformed support masks, an image drawn for each by the fine-tuned
    `generator` (none for the classical source, which deforms image and mask together); or, for a volume
    source, its support slices mapped onto the fold's training volumes by its per-fold model (`generator`,
    None for a source that trains none) with `sampling` holding its pair options."""

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
        elif self.source in VOLUME_SOURCES:
            syn = self.volume_set(images, masks, ids, idx)
        else:
            syn = synthesize(self.generator.path / CHECKPOINT_FILE, images, masks, ids, n=self.n, seed=self.seed,
                             deform=self.deform, query_volumes=self.fold.queries, **self.sampling)
        save_set(syn, folder / "set")

    def volume_set(self, images, masks, ids, idx):
        """A volume source's set; a bad pair (model at another resolution, every warp of a support failing
        its checks) becomes a one-line `DataError` naming it, and nothing is written."""
        from augment.pairs import PairError

        src = volume_source(self.source)
        cid = self.data.spec.class_id(self.class_name)
        volumes = {v: self.data.volume(v).images for v in self.fold.train}  # (Z, R, R)
        labels = {v: self.data.volume(v).labels == cid for v in self.fold.train} if src.reads_labels else None
        try:
            return src.make_set(None if self.generator is None else self.generator.path / CHECKPOINT_FILE,
                                support=(images, masks, ids), support_volume=self.data.volume(self.fold.support).images,
                                support_slices=list(idx), volumes=volumes, labels=labels, n=self.n, seed=self.seed,
                                fold=self.fold.index, class_name=self.class_name, query_volumes=self.fold.queries,
                                **self.sampling)
        except PairError as err:
            raise DataError(str(err)) from None


@dataclass(frozen=True, kw_only=True)
class Refine(Stage):
    """A refiner's set of a class (`augment.registry.Refiner`, e.g. SDEdit): the pairs of `pairs` (the
    refiner's input source's synthesis entry) with each image remade by the class's fine-tuned `generator`,
    the masks kept; `options` holds the refiner's config fields and the generator's sampling keywords."""

    name: ClassVar[str] = "refine"
    version: ClassVar[str] = "1"
    source: str
    class_name: str
    seed: int
    fold: Fold
    pairs: StageEntry
    generator: StageEntry
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return f"{self.source} fold{self.fold.index} s{self.seed} {self.class_name}"

    def produce(self, folder: Path) -> None:
        from augment.synthesis import load_set, save_set
        syn = refiner(self.source).make_set(self.generator.path / CHECKPOINT_FILE, load_set(self.pairs.path / "set"),
                                            seed=self.seed, query_volumes=self.fold.queries, **self.options)
        save_set(syn, folder / "set")


@dataclass(frozen=True, kw_only=True)
class Relabel(Stage):
    """A relabelled source's set of a class (`augment.registered.relabel`): the pairs of `pairs` with their masks
    replaced by the `teacher` segmenter's prediction, given the real supports, where the two agree with Dice >=
    `min_agreement`; at most `n` kept, best agreement first. `teacher` is the baseline arm's model or the one of the
    arm the config names as teacher, never a diagnostic arm's: no test-class label, so the set stays label-free."""

    name: ClassVar[str] = "relabel"
    version: ClassVar[str] = "1"
    source: str
    class_name: str
    seed: int
    data: PreparedData
    fold: Fold
    pairs: StageEntry
    teacher: StageEntry
    min_agreement: float
    n: int
    log_label: str = context()  # source, teacher arm, fold, seed and class: the key names the teacher's model only

    @property
    def label(self) -> str:
        return self.log_label

    def produce(self, folder: Path) -> None:
        from augment.registered import relabel
        from augment.synthesis import load_set, save_set
        from segment import train as seg_train
        from segment.predict import make_predictor
        real_i, real_m, _ = support_pairs(self.data, self.fold, self.class_name)
        syn = load_set(self.pairs.path / "set")
        predict = make_predictor(seg_train.load(self.teacher.path / "model.pt"))
        probs = predict(real_i, real_m, syn.images)                                     # (P, 1, R, R)
        kept = relabel(syn, (probs > 0.5).float(), min_agreement=self.min_agreement, n=self.n, teacher=self.teacher.key)
        save_set(kept, folder / "set")


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
