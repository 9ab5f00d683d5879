"""The plan of an experiment: which stages a config asks for, wired input to output.

This is the one module that reads an `ExperimentConfig`; each stage receives only its own fields.

Honesty rules the plan keeps: a generator learns from the fold's training volumes (superpixel masks,
no labels) and the fold's support pairs only, or pairs made from both (the learned source's warped
supports); every synthetic set's manifest is checked against the fold's query volumes before use;
segmenters never see a test-class label, and a relabelled source's masks come from the baseline arm's model
or the model of the arm the config names as its teacher (never a diagnostic one), which saw none either;
every arm of a (fold, seed) unit is fine-tuned for the same number of steps, from the same base model, on the
same real supports, and scored on the same query volumes.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from augment.manifest import validate_manifest
from augment.registry import CLASSICAL, REFINERS, VOLUME_SOURCES, generator, refiner, source_config, volume_source
from pipelines.config import Arm, ExperimentConfig, as_dict
from pipelines.stages.base import StageEntry, StageRunner
from pipelines.stages.evaluate import EvalRef, Evaluate
from pipelines.stages.generators import GeneratorFinetune, GeneratorPretrain, SourceTrain, Superpixels
from pipelines.stages.inputs import exclusion_sets
from pipelines.stages.report import Report, provenance
from pipelines.stages.segmenters import Finetune, Segmenter
from pipelines.stages.synthesis import Quality, Refine, Relabel, Synthesis
from segment.config import SegmenterConfig, SuperpixelParams
from segment.data.protocol import Fold, make_folds, scored_fold
from segment.data.slices import PreparedData


@dataclass(frozen=True)
class UnitArtifacts:
    """What one (fold, seed) unit hands the report besides its rows."""

    fold: int
    seed: int
    synth: dict[tuple[str, str], StageEntry]  # (source, class) -> synthetic set
    evals: tuple[EvalRef, ...]
    quality: tuple[StageEntry, ...]


def segmenter_config(cfg: ExperimentConfig, model: str, seed: int) -> SegmenterConfig:
    return SegmenterConfig.from_dict({**cfg.segment, "model": model, "resolution": cfg.data.resolution,
                                      "seed": seed, "cpu": cfg.run.cpu})


def generator_config(cfg: ExperimentConfig, name: str, seed: int):
    """A source's config: its [generators.NAME] section (if any) plus the runner's fields."""
    return source_config(name)(**{**cfg.generators.get(name, {}), "resolution": cfg.data.resolution, "seed": seed,
                                  "cpu": cfg.run.cpu})


def superpixel_stage(cfg: ExperimentConfig, data: PreparedData) -> Superpixels:
    """Superpixels at the scale of the [segment] config, which generators and segmenters both read."""
    params = SuperpixelParams(scale=segmenter_config(cfg, "prototype", 0).superpixel_scale)
    return Superpixels(data=data, params=params, cache_dir=cfg.run.cache)


def _generator(cfg, data, fold, seed, name, c, excluded, sp: Superpixels, sp_entry, runner
               ) -> tuple[StageEntry, dict]:
    """Generator `name` pretrained for the fold and fine-tuned for class `c` (on the supports, plus the set of
    the source its `finetune_on` names); its entry and sampling keywords."""
    gen, config = generator(name), generator_config(cfg, name, seed)
    pre = runner(GeneratorPretrain(generator=name, config=gen.stage_config(config), data=data, fold=fold,
                                   excluded=excluded, setting=cfg.protocol.setting, superpixels=sp_entry,
                                   superpixel_params=sp.params, cache_dir=cfg.run.cache))
    added = gen.finetune_source(config)
    pairs = None if added is None else _synthesis(cfg, data, fold, seed, added, c, excluded, sp, sp_entry, runner,
                                                   n=config.finetune_pairs)
    entry = runner(GeneratorFinetune(generator=name, config=gen.finetune_config(config), pretrain=pre, data=data,
                                     fold=fold, class_name=c, setting=cfg.protocol.setting, pairs=pairs))
    return entry, gen.sampling_options(config)


def _synthesis(cfg, data, fold, seed, source, c, excluded, sp: Superpixels, sp_entry, runner, *,
               n: int | None = None) -> StageEntry:
    """A class's synthetic set of `n` pairs (default: [synthesis] n_pairs) from one source, with the models
    and input sets it needs made first."""
    n = cfg.synthesis.n_pairs if n is None else n
    gen_entry, sampling = None, {}
    if source in REFINERS:
        ref, config = refiner(source), generator_config(cfg, source, seed)
        pairs = _synthesis(cfg, data, fold, seed, ref.pairs_from, c, excluded, sp, sp_entry, runner, n=n)
        model, sampling = _generator(cfg, data, fold, seed, ref.model_from, c, excluded, sp, sp_entry, runner)
        entry = runner(Refine(source=source, class_name=c, seed=seed, fold=fold, pairs=pairs, generator=model,
                              options={**ref.options(config), **sampling}))
        validate_manifest(json.loads((entry.path / "set" / "manifest.json").read_text()), fold.queries)
        return entry
    if source in VOLUME_SOURCES:
        src, config = volume_source(source), generator_config(cfg, source, seed)
        if src.trains:  # its own model, or the one it samples (e.g. registered: the learned source's)
            owner = src.model_owner
            gen_entry = runner(SourceTrain(source=owner, config=generator_config(cfg, owner, seed), data=data,
                                           fold=fold))
        sampling = src.pair_options(config)
    elif source != CLASSICAL:
        gen_entry, sampling = _generator(cfg, data, fold, seed, source, c, excluded, sp, sp_entry, runner)
    entry = runner(Synthesis(source=source, class_name=c, n=n, seed=seed, data=data, fold=fold,
                             generator=gen_entry, sampling=sampling))
    validate_manifest(json.loads((entry.path / "set" / "manifest.json").read_text()), fold.queries)  # on the cache
    return entry


def base_segmenters(cfg: ExperimentConfig, data: PreparedData, fold: Fold, seed: int, model: str,
                    classes: tuple[str, ...], sp_entry: StageEntry, runner: StageRunner) -> dict[str, StageEntry]:
    """The base segmenter of each class: one per exclusion set, which never holds a label of the class."""
    seg_cfg = segmenter_config(cfg, model, seed)
    seg_excl = exclusion_sets(data, classes, cfg.protocol.setting, supervised=seg_cfg.mix_supervised > 0)
    bases = {e: runner(Segmenter(config=seg_cfg, data=data, fold=fold, excluded=e, setting=cfg.protocol.setting,
                                 superpixels=sp_entry, cache_dir=cfg.run.cache))
             for e in sorted(set(seg_excl.values()))}
    return {c: bases[seg_excl[c]] for c in classes}


def synthesis_set(cfg: ExperimentConfig, data: PreparedData, fold: Fold, seed: int, source: str, c: str,
                  classes: tuple[str, ...], sp_entry: StageEntry, runner: StageRunner) -> StageEntry:
    """Class `c`'s synthetic set from one source, as a unit of `classes` makes it (before any relabelling)."""
    excl = exclusion_sets(data, classes, cfg.protocol.setting, supervised=False)
    return _synthesis(cfg, data, fold, seed, source, c, excl[c], superpixel_stage(cfg, data), sp_entry, runner)


@dataclass
class ArmModels:
    """The arms' synthetic sets and models of one (fold, seed, model), each asked of the runner once.

    An arm's relabelled sets take the masks of its teacher's model (the baseline arm's unless the arm names
    another), and that model may itself be an arm's fine-tune on its own relabelled sets: a round of
    self-training. `synth` holds the (source, class) sets before relabelling; `bases` the base segmenters.
    """

    cfg: ExperimentConfig
    data: PreparedData
    fold: Fold
    seed: int
    model: str
    bases: dict[str, StageEntry]
    synth: dict[tuple[str, str], StageEntry]
    runner: StageRunner
    made: dict = field(default_factory=dict)

    def teacher_name(self, arm: Arm | None) -> str:
        """The arm whose model relabels `arm`'s relabelled sources (`None`: the baseline arm)."""
        return arm.teacher if arm is not None and arm.teacher else next(
            a.name for a in self.cfg.arms if a.role == "baseline")

    def teacher(self, arm: Arm | None, c: str) -> StageEntry:
        """The model of class `c` that relabels `arm`'s relabelled sources (`None`: the baseline arm's)."""
        name = self.teacher_name(arm)
        return self.tuned(next(a for a in self.cfg.arms if a.name == name), c)

    def tuned(self, arm: Arm, c: str) -> StageEntry:
        """`arm`'s model of class `c`: the base fine-tuned on the real supports and the arm's sets (the entry the
        arm scores), or the base itself when pairs do not enter by fine-tuning."""
        if ("tuned", arm, c) not in self.made:
            syn = arm.synthesis(self.cfg.synthesis)  # the arm's named overrides
            self.made["tuned", arm, c] = self.runner(Finetune(
                base=self.bases[c], class_name=c, steps=syn.finetune_steps, seed=self.seed,
                filter_dice=syn.filter_dice, synthetic_share=syn.synthetic_share, data=self.data, fold=self.fold,
                synthesis=self.sets(arm, c),
                log_label=f"{self.model} {arm.name} fold{self.fold.index} s{self.seed} {c}",
            )) if syn.in_training else self.bases[c]
        return self.made["tuned", arm, c]

    def sets(self, arm: Arm, c: str) -> tuple[StageEntry, ...]:
        """Class `c`'s synthetic sets of `arm`, one per source."""
        return tuple(self.set_of(s, c, arm) for s in arm.sources)

    def set_of(self, source: str, c: str, arm: Arm | None = None) -> StageEntry:
        """`source`'s set of class `c` as `arm` uses it: relabelled by the arm's teacher where the source is
        relabelled (`None`: by the baseline arm's model)."""
        relabelled = source in VOLUME_SOURCES and volume_source(source).relabelled
        return self.relabelled(source, c, arm) if relabelled else self.synth[source, c]

    def drawn(self) -> dict[tuple[str, str], StageEntry]:
        """Every set the arms use, once, by (name, class) for the report: a relabelled source once per teacher,
        named "SOURCE, taught by ARM" where that teacher is not the baseline arm."""
        sets = {(s, c): self.set_of(s, c) for (s, c) in self.synth}
        for arm in self.cfg.arms:
            for s, c in self.synth:
                if s in arm.sources and (taught := self.set_of(s, c, arm)) != sets[s, c]:
                    sets[f"{s}, taught by {self.teacher_name(arm)}", c] = taught
        return sets

    def relabelled(self, source: str, c: str, arm: Arm | None = None) -> StageEntry:
        """`source`'s set of class `c` with the masks of `arm`'s teacher, kept where they agree with the source's."""
        tutor = self.teacher(arm, c)
        if ("relabel", source, c, tutor.key) not in self.made:
            entry = self.runner(Relabel(
                source=source, class_name=c, seed=self.seed, data=self.data, fold=self.fold,
                pairs=self.synth[source, c], teacher=tutor, n=self.cfg.synthesis.n_pairs,
                min_agreement=generator_config(self.cfg, source, self.seed).min_agreement,
                log_label=f"{source}, taught by {self.teacher_name(arm)} fold{self.fold.index} s{self.seed} {c}"))
            validate_manifest(json.loads((entry.path / "set" / "manifest.json").read_text()), self.fold.queries)
            self.made["relabel", source, c, tutor.key] = entry
        return self.made["relabel", source, c, tutor.key]


def run_unit(cfg: ExperimentConfig, data: PreparedData, fold: Fold, seed: int, classes: tuple[str, ...],
             sp_entry: StageEntry, runner: StageRunner) -> tuple[list[dict], UnitArtifacts]:
    """Every stage of one (fold, seed) unit; returns its Dice rows and the artifacts for the report."""
    excl = exclusion_sets(data, classes, cfg.protocol.setting, supervised=False)  # the sources'; bases may split below
    sp = superpixel_stage(cfg, data)
    scored = scored_fold(fold, cfg.protocol.score_on)  # what Evaluate scores: its query volumes, or its training ones
    # 1. synthetic pairs per source and class (generators first where a source needs one)
    synth = {(s, c): _synthesis(cfg, data, fold, seed, s, c, excl[c], sp, sp_entry, runner)
             for s in cfg.sources for c in classes}
    # 2. per model: base segmenter per exclusion set, fine-tuned per arm and class, then scored
    rows, evals, quality = [], [], []
    for model in cfg.models:
        base_of = base_segmenters(cfg, data, fold, seed, model, classes, sp_entry, runner)
        made = ArmModels(cfg, data, fold, seed, model, base_of, synth, runner)
        for arm in cfg.arms:  # 3. each arm fine-tuned per class (relabelled sets taught by the arm's teacher), scored
            syn = arm.synthesis(cfg.synthesis)
            arm_sets = {c: made.sets(arm, c) for c in classes}
            tuned = {c: made.tuned(arm, c) for c in classes}
            pools = {c: _synthetic_pool(tuned[c].path) if arm.sources and syn.in_training else None for c in classes}
            at_test = syn.at_test and any(arm_sets.values())
            for protocol in cfg.protocol.protocols:
                entry = runner(Evaluate(
                    model=model, arm=arm.name, role=arm.role, protocol=protocol, classes=classes, seed=seed,
                    data=data, fold=scored, tuned=tuned, test_supports=arm_sets if at_test else {},
                    bases=base_of if at_test and syn.filter_dice > 0 else {},
                    max_test_supports=syn.max_test_supports if at_test else 0,
                    filter_dice=syn.filter_dice if at_test else 0.0, overlays=cfg.run.overlays))
                rows += [r | {"synthetic_pairs": pools[r["class"]]}
                         for r in json.loads((entry.path / "rows.json").read_text())["rows"]]
                evals.append(EvalRef(model, arm.name, protocol, fold.index, seed, entry))
        if model == cfg.models[0]:  # 4. quality of every set the arms used, judged by the first model's base segmenter
            drawn = made.drawn()  # what the report draws: a relabelled source once per teacher
            quality += [runner(Quality(source=s, class_name=c, seed=seed, data=data, fold=fold, synthesis=entry,
                                       base=base_of[c])) for (s, c), entry in drawn.items() if _size(entry)]
    return rows, UnitArtifacts(fold.index, seed, drawn, tuple(evals), tuple(quality))


def _size(entry: StageEntry) -> int:
    """How many pairs a synthetic set holds."""
    return len(json.loads((entry.path / "set" / "manifest.json").read_text())["source"])


def _synthetic_pool(finetune_dir: Path) -> int:
    """How many synthetic pairs the filter kept for a fine-tune (its pool.json)."""
    return int(json.loads((finetune_dir / "pool.json").read_text())["synthetic"])


def report_stage(cfg: ExperimentConfig, data: PreparedData, rows: list[dict], units: list[UnitArtifacts],
                 failed_units: list[dict] = ()) -> Report:
    """The report of every finished unit; the first unit's synthetic sets are drawn."""
    first = units[0]
    pairs: dict[str, dict[str, StageEntry]] = {}
    for (s, c), entry in first.synth.items():
        pairs.setdefault(c, {})[s] = entry
    threshold = max([a.synthesis(cfg.synthesis).filter_dice for a in cfg.arms] + [0.0]) or 0.5
    return Report(experiment=cfg.name, config=as_dict(cfg), data=data, arms=tuple(a.name for a in cfg.arms),
                  protocols=cfg.protocol.protocols, models=cfg.models, overlays=cfg.run.overlays, filter_dice=threshold,
                  postprocess=cfg.protocol.postprocess, rows=tuple(rows),
                  evals=tuple(e for u in units for e in u.evals), quality=tuple(q for u in units for q in u.quality),
                  pairs=pairs, first_fold=make_folds(data.ids, data.spec.n_folds)[first.fold],
                  units=tuple((u.fold, u.seed) for u in units), failed_units=tuple(failed_units),
                  provenance=provenance(cfg.run.cpu))
