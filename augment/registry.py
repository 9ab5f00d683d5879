"""Every learned source of synthetic pairs, by name: its config class, how to train it and how to sample it.

The experiment config, the pipeline's stages and `augment.synthesis` look a generator up here and nowhere
else, so a new source (a learned transform, another generative model) is added by one entry below and its
own module, touching neither the stages nor the report. The model modules (torch, diffusers) are imported
only when a generator trains or samples, so reading a config stays torch-free.

A source's module provides `train(config, *, pretrain_pairs, finetune_pairs, provenance, out_dir,
init_checkpoint) -> Path` and `sample(checkpoint, masks, *, seed, **sampling) -> (images, masks)`, both
`(N, 1, R, R)`, like `augment.ddpm` and `augment.gan`.

A volume source (`VolumeSource`, e.g. the learned transforms) works from whole volumes instead: its
optional per-fold model learns from the IMAGES of the fold's training volumes, `train(config, *, volumes,
fold, query_volumes, out_dir) -> Path`, and `make_set(checkpoint, *, support, support_volume,
support_slices, volumes, labels, n, seed, fold, class_name, query_volumes, **pair_options) -> SyntheticSet`
makes a class's pairs from its support slices. `labels` (the class's labels of the training volumes) is
given only to a source marked `reads_labels`, which the experiment config allows only in diagnostic arms.
A volume source may sample another's model (`model_from`, e.g. the registered source uses the learned
source's registration), and may be `relabelled`: the pipeline replaces its masks with the segmenter's own
prediction where the two agree (`augment.registered.relabel`).

A generator's per-class fine-tune learns from the class's supports alone, or (`finetune_on` in its config)
also from a volume source's set (`Generator.finetune_source`). A refiner (`Refiner`, e.g. SDEdit) remakes
the images of another source's set with a generator fine-tuned for the class: `make_set(checkpoint, pairs,
*, seed, query_volumes, **options) -> SyntheticSet`, the masks kept.
"""
from __future__ import annotations

import dataclasses
import importlib
from dataclasses import dataclass
from pathlib import Path

from augment.config import (FINETUNE_ON, DDPMConfig, GANConfig, LearnedConfig, OracleConfig, PropagatedConfig,
                            RegisteredConfig, SDEditConfig)

CLASSICAL = "classical"  # the one source that learns nothing: support image and mask deformed together
CHECKPOINT_FILE = "checkpoint.pt"  # a trained source's weights in its folder: the entry point callers name
SUPPORTS = FINETUNE_ON[0]  # `finetune_on` of a generator fine-tuned on the class's real supports alone


@dataclass(frozen=True)
class Generator:
    """One learned source of pairs.

    `finetune_fields` are read only by the per-class fine-tune and `sampling` maps the config fields read
    only when sampling to the keyword of the module's `sample`; the pipeline keeps both out of the stages
    that do not read them, so changing them re-runs exactly what they change.
    """

    name: str
    config: type  # a frozen dataclass with resolution, seed and cpu fields
    module: str  # imported on first use
    finetune_fields: tuple[str, ...] = ()
    sampling: tuple[tuple[str, str], ...] = ()  # (config field, keyword of `sample`)
    sampler_field: str | None = None  # the config field naming the sampler, recorded in a set's manifest

    def train(self, config, **kwargs) -> Path:
        """Train (pretrain and/or fine-tune) into `out_dir`; see the module's `train`."""
        return importlib.import_module(self.module).train(config, **kwargs)

    def sample(self, checkpoint: dict, masks, *, seed: int, **sampling):
        """Images for `masks` `(N, 1, R, R)`; `sampling` holds the keywords of `sampling_options`."""
        return importlib.import_module(self.module).sample(checkpoint, masks, seed=seed, **sampling)

    def sampling_options(self, config) -> dict:
        """The keywords `sample` takes, from a config: what a synthesis stage reads of it."""
        return {keyword: getattr(config, field) for field, keyword in self.sampling}

    def finetune_source(self, config) -> str | None:
        """The volume source whose set of the class the fine-tune adds to the supports (None: supports alone)."""
        return None if config.finetune_on == SUPPORTS else config.finetune_on

    def finetune_config(self, config):
        """What the per-class fine-tune reads: the finetune fields (`finetune_pairs` only when pairs are added)."""
        keep = self.finetune_fields if self.finetune_source(config) else \
            tuple(f for f in self.finetune_fields if f != "finetune_pairs")
        return self.stage_config(config, keep=keep)

    def stage_config(self, config, *, keep: tuple[str, ...] = ()):
        """`config` with the finetune and sampling fields not in `keep` reset to their defaults: the part
        of it a stage reads (pretraining keeps none, the fine-tune keeps `finetune_fields`)."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        drop = [f for f in (*self.finetune_fields, *(f for f, _ in self.sampling)) if f not in keep]
        return dataclasses.replace(config, **{f: defaults[f] for f in drop})


GENERATORS: dict[str, Generator] = {
    "ddpm": Generator("ddpm", DDPMConfig, "augment.ddpm",
                      finetune_fields=("finetune_steps", "finetune_lr", "finetune_on", "finetune_pairs"),
                      sampling=(("sampler", "sampler"), ("sample_steps", "steps"), ("sample_batch", "batch_size")),
                      sampler_field="sampler"),
    "gan": Generator("gan", GANConfig, "augment.gan",
                     finetune_fields=("finetune_steps", "finetune_lr_scale", "finetune_on", "finetune_pairs")),
}


@dataclass(frozen=True)
class VolumeSource:
    """A source of pairs made from whole volumes of the fold (see the module docstring).

    `pair_fields` are read only by `make_set`: the training stage leaves them out of its cache key, so
    changing one never retrains the model. `needs_section`: an arm may use the source only if the
    experiment config has a [generators.NAME] section (a source with nothing to set needs none).
    `model_from`: the source whose per-fold model this one samples (None: its own, if it `trains`).
    `relabelled`: its masks are replaced by the segmenter's prediction where the two agree with Dice >= the
    config's `min_agreement`, and its pairs where they do not are dropped (see `augment.registered`).
    `late_fields`: pair fields added after sets had been cached, left out of `pair_options` while at their default
    (which does what the source did before them), so those sets keep their keys.
    """

    name: str
    config: type  # a frozen dataclass with resolution, seed and cpu fields
    module: str  # imported on first use
    trains: bool = True  # a per-fold model trained on the images of the fold's training volumes
    reads_labels: bool = False  # reads the training volumes' TRUE labels of the class: diagnostic only
    pair_fields: tuple[str, ...] = ()
    needs_section: bool = True
    model_from: str | None = None
    relabelled: bool = False
    late_fields: tuple[str, ...] = ()

    @property
    def model_owner(self) -> str:
        """The source whose per-fold model this one samples."""
        return self.model_from or self.name

    def train(self, config, **kwargs) -> Path:
        return importlib.import_module(self.module).train(config, **kwargs)

    def make_set(self, checkpoint: Path | None, **kwargs):
        return importlib.import_module(self.module).make_set(checkpoint, **kwargs)

    def pair_options(self, config) -> dict:
        """The keywords of `make_set` that come from the config. A late field at its default is left out, so
        the sets cached before it existed keep their keys; `make_set` takes the same default."""
        defaults = {f.name: f.default for f in dataclasses.fields(self.config)}
        return {f: getattr(config, f) for f in self.pair_fields
                if f not in self.late_fields or getattr(config, f) != defaults[f]}


VOLUME_SOURCES: dict[str, VolumeSource] = {
    "learned": VolumeSource("learned", LearnedConfig, "augment.learned",
                            pair_fields=("z_window", "max_folded_share", "min_similarity", "min_area_ratio",
                                         "max_area_ratio", "min_fragment_px", "appearance",
                                         "appearance_regions")),
    "propagated": VolumeSource("propagated", PropagatedConfig, "augment.propagated", trains=False,
                               pair_fields=("offsets", "max_folded_share", "min_area_ratio", "max_area_ratio",
                                            "min_fragment_px", "appearance"), needs_section=False,
                               late_fields=("appearance",)),
    "oracle": VolumeSource("oracle", OracleConfig, "augment.oracle", trains=False, reads_labels=True,
                           needs_section=False),
    "registered": VolumeSource("registered", RegisteredConfig, "augment.registered", model_from="learned",
                               relabelled=True, needs_section=False,
                               pair_fields=("z_window", "max_folded_share", "min_similarity", "min_area_ratio",
                                            "max_area_ratio", "min_fragment_px")),
}


@dataclass(frozen=True)
class Refiner:
    """A source that remakes the images of `pairs_from`'s set of a class with `model_from`'s generator fine-tuned
    for that class, keeping the masks (see the module docstring). An arm using it needs [generators.NAME]
    sections for itself and for both inputs; `fields` are the config fields `make_set` reads."""

    name: str
    config: type  # a frozen dataclass with resolution, seed and cpu fields
    module: str  # imported on first use
    pairs_from: str  # a volume source
    model_from: str  # a generator
    fields: tuple[str, ...] = ()

    def make_set(self, checkpoint: Path, pairs, **kwargs):
        return importlib.import_module(self.module).make_set(checkpoint, pairs, **kwargs)

    def options(self, config) -> dict:
        """The keywords of `make_set` that come from the config."""
        return {f: getattr(config, f) for f in self.fields}

    def check_model(self, config) -> None:
        """A refiner keeps the masks, so its generator must condition on them rather than redraw them."""
        if getattr(config, "joint", False):
            raise ValueError(f"{self.name} keeps the masks, but {self.model_from} joint = true redraws them; "
                             f"set joint = false")


REFINERS: dict[str, Refiner] = {
    "sdedit": Refiner("sdedit", SDEditConfig, "augment.sdedit", pairs_from="learned", model_from="ddpm",
                      fields=("strength",)),
}


def refiner(name: str) -> Refiner:
    """The registered refiner `name`; the error lists the known ones."""
    if name not in REFINERS:
        raise KeyError(f"unknown refiner {name!r}; registered: {sorted(REFINERS)}")
    return REFINERS[name]


def source_config(name: str) -> type:
    """The config class of any learned source: a generator, a volume source or a refiner."""
    for table in (GENERATORS, VOLUME_SOURCES, REFINERS):
        if name in table:
            return table[name].config
    raise KeyError(f"unknown source {name!r}; registered: {sorted(GENERATORS | VOLUME_SOURCES | REFINERS)}")


def volume_source(name: str) -> VolumeSource:
    """The registered volume source `name`; the error lists the known ones."""
    if name not in VOLUME_SOURCES:
        raise KeyError(f"unknown volume source {name!r}; registered: {sorted(VOLUME_SOURCES)}")
    return VOLUME_SOURCES[name]


def generator(name: str) -> Generator:
    """The registered generator `name`; the error lists the known ones."""
    if name not in GENERATORS:
        raise KeyError(f"unknown generator {name!r}; registered: {sorted(GENERATORS)}")
    return GENERATORS[name]
