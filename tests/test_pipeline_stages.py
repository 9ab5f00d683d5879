"""Stages: a cache key that no input can be missing from, generated over the fields of every stage class."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from augment.config import DDPMConfig, LearnedConfig
from augment.masks import DeformConfig
from pipelines.stages.base import KEYED, Stage, StageEntry, identity, stage_classes
from pipelines.stages.evaluate import EvalRef, Evaluate
from augment.registry import volume_source
from pipelines.stages.generators import GeneratorFinetune, GeneratorPretrain, SourceTrain, Superpixels
from pipelines.stages.report import Report
from pipelines.stages.segmenters import Finetune, Segmenter
from pipelines.stages.synthesis import Quality, Refine, Relabel, Synthesis
from segment.config import SegmenterConfig, SuperpixelParams
from segment.data.protocol import Fold
from segment.data.slices import PreparedData

DATA = PreparedData(spec=None, resolution=32, volumes=(), key="data-1", path=Path("slices"), source=Path("data"))
FOLD = Fold(index=0, support="1", queries=("2", "3"), train=("4", "5"))
ENTRY = StageEntry(Path("e"), "entry-1")
COMMON = {"data": DATA, "fold": FOLD}

SAMPLES: list[Stage] = [
    Superpixels(data=DATA, params=SuperpixelParams(), cache_dir="c"),
    GeneratorPretrain(generator="ddpm", config=DDPMConfig(), excluded=(1, 2), setting=1, superpixels=ENTRY,
                      superpixel_params=SuperpixelParams(), cache_dir="c", **COMMON),
    GeneratorFinetune(generator="ddpm", config=DDPMConfig(), pretrain=ENTRY, class_name="liver", setting=1, pairs=ENTRY,
                      **COMMON),
    Refine(source="sdedit", class_name="liver", seed=0, fold=FOLD, pairs=ENTRY, generator=ENTRY,
           options={"strength": 0.5, "steps": 2}),
    Synthesis(source="ddpm", class_name="liver", n=4, seed=0, deform=DeformConfig(), generator=ENTRY,
              sampling={"steps": 2}, **COMMON),
    Relabel(source="registered", class_name="liver", seed=0, pairs=ENTRY, teacher=ENTRY, min_agreement=0.7, n=12,
            log_label="a", **COMMON),
    Quality(source="ddpm", class_name="liver", seed=0, synthesis=ENTRY, base=ENTRY, **COMMON),
    Segmenter(config=SegmenterConfig(), excluded=(1,), setting=1, superpixels=ENTRY, cache_dir="c", **COMMON),
    SourceTrain(source="learned", config=LearnedConfig(), **COMMON),
    Finetune(base=ENTRY, class_name="liver", steps=3, seed=0, filter_dice=0.5, synthetic_share=0.5, synthesis=(ENTRY,),
             log_label="a", **COMMON),
    Evaluate(model="prototype", arm="a", role="baseline", protocol="EP1", classes=("liver",), seed=0,
             tuned={"liver": ENTRY}, test_supports={"liver": (ENTRY,)}, bases={"liver": ENTRY},
             max_test_supports=2, filter_dice=0.5, dice_grid="native", overlays=1, **COMMON),
    Report(experiment="x", config={"a": 1}, data=DATA, arms=("a",), protocols=("EP1",), models=("prototype",),
           overlays=1, filter_dice=0.5, postprocess=False, rows=({"dice": 0.5},),
           evals=(EvalRef("prototype", "a", "EP1", 0, 0, ENTRY),), quality=(ENTRY,),
           pairs={"liver": {"ddpm": ENTRY}}, first_fold=FOLD, units=((0, 0),), failed_units=({"fold": 1},),
           provenance={"commit": "abc"}),
]


def changed(value):
    """A different value of the same type (the first changeable part of a container or dataclass)."""
    if isinstance(value, bool):
        return not value
    if isinstance(value, int | float):
        return value + 1
    if isinstance(value, str):
        return value + "-x"
    if isinstance(value, StageEntry | PreparedData):
        return dataclasses.replace(value, key=value.key + "-x")
    if isinstance(value, dict):
        k = next(iter(value))
        return {**value, k: changed(value[k])}
    if isinstance(value, tuple):
        return (changed(value[0]), *value[1:])
    if dataclasses.is_dataclass(value):
        for f in dataclasses.fields(value):
            try:
                return dataclasses.replace(value, **{f.name: changed(getattr(value, f.name))})
            except ValueError:  # a config whose first fields depend on each other: change the next one
                continue
    raise TypeError(f"no change for {value!r}")


def test_every_stage_class_has_a_sample():
    assert {type(s).name for s in SAMPLES} == set(stage_classes())


@pytest.mark.parametrize("stage", SAMPLES, ids=lambda s: s.name)
def test_changing_any_field_changes_the_key_and_a_context_field_never_does(stage):
    key = stage.key()
    for f in dataclasses.fields(stage):
        other = dataclasses.replace(stage, **{f.name: changed(getattr(stage, f.name))})
        if f.metadata.get(KEYED, True):
            assert other.key() != key, f"{stage.name}.{f.name} is not in the key"
        else:
            assert other.key() == key, f"{stage.name}.{f.name} is a context field but changes the key"


def test_a_source_model_key_ignores_the_pair_fields_its_training_never_reads():
    stage = SourceTrain(source="learned", config=LearnedConfig(), **COMMON)
    for pair_field in volume_source("learned").pair_fields:  # e.g. `appearance` or a check threshold
        value = getattr(stage.config, pair_field)
        new = ("slice" if isinstance(value, str) else (not value) if isinstance(value, bool)
               else value + 1 if isinstance(value, int) else value / 2)
        other = dataclasses.replace(stage.config, **{pair_field: new})
        assert dataclasses.replace(stage, config=other).key() == stage.key(), pair_field
    assert dataclasses.replace(stage, config=LearnedConfig(steps=7)).key() != stage.key()  # a model field


def test_a_field_without_an_identity_is_refused_not_skipped():
    with pytest.raises(TypeError, match=r"x = .*: a PosixPath has no identity for a stage key"):
        identity(Path("somewhere"), "x")
