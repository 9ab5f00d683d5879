"""Generator stages: superpixels of every slice, a generator pretrained per fold on the unlabelled pool,
then fine-tuned per class on the fold's support pairs (plus a volume source's pairs if its config says so),
and a volume source's model trained per fold on the images of the fold's training volumes. Both come from
`augment.registry`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np

from augment.manifest import Provenance, refs
from augment.registry import CHECKPOINT_FILE, VOLUME_SOURCES, generator, volume_source
from pipelines.stages.base import Stage, StageEntry, context
from pipelines.stages.inputs import support_pairs
from segment.config import SuperpixelParams
from segment.data.protocol import Fold, training_slice_mask
from segment.data.slices import PreparedData

if TYPE_CHECKING:  # torch loads inside the functions, so a fully cached run never imports it
    import torch


@dataclass(frozen=True, kw_only=True)
class Superpixels(Stage):
    """Felzenszwalb superpixels of every slice (label-free), shared by segmenters and generators."""

    name: ClassVar[str] = "superpixels"
    version: ClassVar[str] = "2"
    data: PreparedData
    params: SuperpixelParams
    cache_dir: str = context()

    @property
    def label(self) -> str:
        return self.data.spec.name

    def produce(self, folder: Path) -> None:
        from segment.data.superpixels import superpixels
        maps = superpixels(self.data, params=self.params, cache_dir=self.cache_dir)
        (folder / "volumes.json").write_text(json.dumps({v: int(m.max()) for v, m in maps.items()}))


def pretrain_pairs(data: PreparedData, fold: Fold, excluded: tuple[int, ...], setting: int, params: SuperpixelParams,
                   cache_dir: str, seed: int) -> tuple[tuple[torch.Tensor, torch.Tensor], list[tuple[str, int]]]:
    """Unlabelled pool of a fold: each allowed training slice with one random superpixel as its mask."""
    import torch

    from segment.data.superpixels import superpixels
    maps = superpixels(data, params=params, cache_dir=cache_dir, volume_ids=fold.train)
    rng = np.random.default_rng(seed)
    images, masks, used = [], [], []
    for vid in fold.train:
        vol = data.volume(vid)
        allowed = training_slice_mask(vol.labels, excluded, setting)
        for z in np.flatnonzero(allowed):
            ids, counts = np.unique(maps[vid][z], return_counts=True)
            keep = ids[(ids > 0) & (counts >= 0.002 * maps[vid][z].size) & (counts < 0.5 * maps[vid][z].size)]
            if not len(keep):
                continue
            images.append(vol.images[z])
            masks.append(maps[vid][z] == rng.choice(keep))
            used.append((vid, int(z)))
    pairs = (torch.from_numpy(np.stack(images)[:, None].copy()),  # (N, 1, R, R)
             torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)))
    return pairs, used


@dataclass(frozen=True, kw_only=True)
class GeneratorPretrain(Stage):
    """One generator per fold, pretrained on the unlabelled pool of the fold's training volumes; its
    config holds no fine-tune or sampling field (the registry resets them), so those never re-run it."""

    name: ClassVar[str] = "generator-pretrain"
    version: ClassVar[str] = "3"
    generator: str
    config: Any  # the generator's config class (augment.registry)
    data: PreparedData
    fold: Fold
    excluded: tuple[int, ...]
    setting: int
    superpixels: StageEntry
    superpixel_params: SuperpixelParams  # which superpixel maps make the pool: an input, so in the key
    cache_dir: str = context()

    @property
    def label(self) -> str:
        return f"{self.generator} fold{self.fold.index} s{self.config.seed}"

    def produce(self, folder: Path) -> None:
        pairs, used = pretrain_pairs(self.data, self.fold, self.excluded, self.setting, self.superpixel_params,
                                     self.cache_dir, self.config.seed)
        prov = Provenance(fold=self.fold.index, setting=self.setting, query_volumes=self.fold.queries,
                          pretrain=tuple(r for v, z in used for r in refs(v, [z])))
        generator(self.generator).train(self.config, pretrain_pairs=pairs, provenance=prov, out_dir=folder)


@dataclass(frozen=True, kw_only=True)
class GeneratorFinetune(Stage):
    """The fold's pretrained generator fine-tuned on one class's support pairs, plus the pairs of `pairs` (a
    volume source's synthesis entry of this fold, seed and class) when its config's `finetune_on` names one."""

    name: ClassVar[str] = "generator"
    version: ClassVar[str] = "4"
    generator: str
    config: Any  # with the fine-tune fields, without the sampling ones
    pretrain: StageEntry
    data: PreparedData
    fold: Fold
    class_name: str
    setting: int
    pairs: StageEntry | None = None  # the set added to the supports (None: the supports alone)

    @property
    def label(self) -> str:
        return f"{self.generator} fold{self.fold.index} s{self.config.seed} {self.class_name}"

    def produce(self, folder: Path) -> None:
        from augment.finetune_pairs import finetune_pairs
        from augment.synthesis import load_set
        images, masks, idx = support_pairs(self.data, self.fold, self.class_name)
        added = None if self.pairs is None else load_set(self.pairs.path / "set")
        pairs, prov = finetune_pairs((images, masks, refs(self.fold.support, idx)), added, fold=self.fold.index,
                                     class_name=self.class_name, setting=self.setting, query_volumes=self.fold.queries)
        generator(self.generator).train(self.config, finetune_pairs=pairs, provenance=prov,  # (S [+ N], 1, R, R)
                                        out_dir=folder, init_checkpoint=self.pretrain.path / CHECKPOINT_FILE)


@dataclass(frozen=True, kw_only=True)
class SourceTrain(Stage):
    """A volume source's model for one fold (e.g. the learned transforms' registration network), trained on
    the IMAGES of the fold's training volumes: no label is read, and the source refuses a query volume."""

    name: ClassVar[str] = "source-train"
    version: ClassVar[str] = "1"
    source: str
    config: Any  # the source's config; its pair fields (augment.registry) stay out of the key
    data: PreparedData
    fold: Fold

    @property
    def label(self) -> str:
        return f"{self.source} fold{self.fold.index} s{self.config.seed}"

    def fields(self) -> dict[str, Any]:
        """The keyed fields, the config without its pair fields: training never reads them, so adding one or
        changing its default keeps every trained model."""
        out = super().fields()
        known = self.source in VOLUME_SOURCES  # an unknown source is refused when the stage runs
        pair = set(VOLUME_SOURCES[self.source].pair_fields) if known else set()
        out["config"] = {k: v for k, v in out["config"].items() if k not in pair}
        return out

    def produce(self, folder: Path) -> None:
        volumes = {vid: self.data.volume(vid).images for vid in self.fold.train}  # (Z, R, R) images only
        volume_source(self.source).train(self.config, volumes=volumes, fold=self.fold.index,
                                         query_volumes=self.fold.queries, out_dir=folder)
