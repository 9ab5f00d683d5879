"""Segmenter stages: the base segmenter of a fold, and its fine-tune on a class's real and synthetic pool."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from pipelines.stages.base import Stage, StageEntry, context
from pipelines.stages.inputs import support_pairs, synthetic_pairs
from segment.config import SegmenterConfig
from segment.data.protocol import Fold
from segment.data.slices import PreparedData


@dataclass(frozen=True, kw_only=True)
class Segmenter(Stage):
    """The base segmenter of a fold: superpixel (and allowed supervised) episodes, no test-class label."""

    name: ClassVar[str] = "segmenter"
    version: ClassVar[str] = "2"
    config: SegmenterConfig
    data: PreparedData
    fold: Fold
    excluded: tuple[int, ...]
    setting: int
    superpixels: StageEntry
    cache_dir: str = context()

    @property
    def label(self) -> str:
        return f"{self.config.model} fold{self.fold.index} s{self.config.seed}"

    def produce(self, folder: Path) -> None:
        from segment import train as seg_train
        seg_train.train(self.config, self.data, self.fold, test_class_ids=self.excluded, setting=self.setting,
                        out_dir=folder, cache_dir=self.cache_dir)


@dataclass(frozen=True, kw_only=True)
class Finetune(Stage):
    """The base segmenter fine-tuned on a class's pool: real supports plus the arm's synthetic pairs, pooled
    and sampled uniformly, or with `synthetic_share` of each batch drawn from the synthetic pairs."""

    name: ClassVar[str] = "finetune"
    version: ClassVar[str] = "2"
    base: StageEntry
    class_name: str
    steps: int
    seed: int
    filter_dice: float
    synthetic_share: float | None
    data: PreparedData
    fold: Fold
    synthesis: tuple[StageEntry, ...]  # the arm's sets of this class, one per source
    log_label: str = context()  # model, arm, fold, seed and class: arms with the same pool share one entry

    @property
    def label(self) -> str:
        return self.log_label

    def produce(self, folder: Path) -> None:
        import torch

        from segment import train as seg_train
        real_i, real_m, _ = support_pairs(self.data, self.fold, self.class_name)
        syn_i, syn_m = synthetic_pairs(self.data, self.fold, self.class_name, self.synthesis, base_model=self.base,
                                       min_dice=self.filter_dice)
        share = self.synthetic_share if len(syn_i) else None  # no synthetic pair: the real supports alone
        (folder / "pool.json").write_text(json.dumps({"real": len(real_i), "synthetic": len(syn_i),
                                                      "synthetic_share": share}))
        if share is None:
            seg_train.finetune(self.base.path / "model.pt", torch.cat([real_i, syn_i]), torch.cat([real_m, syn_m]),
                               out_dir=folder, steps=self.steps, seed=self.seed)
        else:
            seg_train.finetune(self.base.path / "model.pt", real_i, real_m, out_dir=folder, steps=self.steps,
                               seed=self.seed, synthetic=(syn_i, syn_m), synthetic_share=share)
