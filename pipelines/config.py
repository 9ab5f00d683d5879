"""One experiment = one TOML file, parsed into frozen typed dataclasses and validated at load.

Sections: [data], [protocol], [segment] (overrides of the segmenter's training config), [generators.NAME]
(overrides of each generator's config), [synthesis], [[arms]] and [run]. An unknown key or a bad value
raises `ConfigError` naming the section, the key and the valid choices. The segmenter and generator
sections are checked against the stages' own config dataclasses, so this module holds no copy of them.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from augment.registry import CLASSICAL, GENERATORS, REFINERS, VOLUME_SOURCES  # torch-free: the models load only to train or sample
# torch-free: loading a config imports no torch
from segment.config import MODELS, PROTOCOLS, RESOLUTIONS, SCORE_ON, SETTINGS
ROLES = ("baseline", "control", "augmented", "diagnostic")  # what an arm is for in the tests; its name is a label


class ConfigError(ValueError):
    """An experiment config that cannot run as written."""


def _no_repeats(where: str, values: tuple) -> None:
    """A repeated fold, seed, protocol, class or model would duplicate rows and invent significance."""
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise ConfigError(f"{where} = {list(values)}; {repeated} repeat(s): give each value once")


def _check_pair_use(where: str, filter_dice: float | None, max_test_supports: int | None) -> None:
    if filter_dice is not None and not 0.0 <= filter_dice <= 1.0:
        raise ConfigError(f"{where} filter_dice = {filter_dice}; it is a Dice threshold in [0, 1] (0 keeps every pair)")
    if max_test_supports is not None and max_test_supports < 0:
        raise ConfigError(f"{where} max_test_supports = {max_test_supports}; it must be >= 0")


def _check_output_folder(key: str, value: str, example: str) -> None:
    """[run] out and cache must be folders of their own: not empty, not the working folder (the repository
    root when run from it) or any folder above it, where a report or `cache gc` would mix with other files."""
    if not value.strip():
        raise ConfigError(f"[run] {key} = {value!r}; give a folder of its own, e.g. {example!r}")
    folder = Path(value).resolve()
    if Path.cwd().resolve().is_relative_to(folder):
        raise ConfigError(f"[run] {key} = {value!r} resolves to {folder}, the working folder or one above it; "
                          f"give a folder of its own, e.g. {example!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the volumes come from: a data folder (read only, never written) or the built-in phantom."""

    path: str | None = None  # folder of image_N / label_N volumes; relative paths are taken from the working folder
    spec: str | None = None  # built-in spec name or spec TOML; default: dataset.toml in the data folder
    resolution: int = 128
    phantom: bool = False  # the data is the built-in phantom, built once under [run] cache (no path, no spec)
    phantom_volumes: int = 8
    phantom_size: int = 96
    phantom_seed: int = 0

    def __post_init__(self) -> None:
        if self.resolution not in RESOLUTIONS:
            raise ConfigError(f"[data] resolution = {self.resolution}; it must be a multiple of "
                              f"{RESOLUTIONS.step} from {RESOLUTIONS.start} to {RESOLUTIONS[-1]}")
        if not self.phantom:
            if not self.path:
                raise ConfigError(f"[data] path = {self.path!r}; give the folder of volumes, or phantom = true "
                                  f"for the built-in phantom")
            return
        for key in ("path", "spec"):
            if getattr(self, key) is not None:
                raise ConfigError(f"[data] {key} = {getattr(self, key)!r} with phantom = true; the phantom is "
                                  f"built under [run] cache with its own spec: remove {key} (or run with --data "
                                  f"to use a data folder instead)")
        if not 2 <= self.phantom_volumes <= 64:
            raise ConfigError(f"[data] phantom_volumes = {self.phantom_volumes}; it must be in 2..64")
        if not 16 <= self.phantom_size <= 512:
            raise ConfigError(f"[data] phantom_size = {self.phantom_size}; it must be in 16..512")
        if self.phantom_seed < 0:
            raise ConfigError(f"[data] phantom_seed = {self.phantom_seed}; it must be >= 0")


def is_dice_gain(value: Any) -> bool:
    """A target gain: a number of Dice points in [0, 100] (NaN and booleans are not)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and 0 <= value <= 100


@dataclass(frozen=True)
class ProtocolConfig:
    setting: int = 1
    protocols: tuple[str, ...] = ("EP1",)
    folds: tuple[int, ...] | None = None  # None: every fold of the spec
    classes: tuple[str, ...] | None = None  # None: every class of the spec
    seeds: tuple[int, ...] = (0,)
    diagnostic: bool = False  # a diagnostic run: arms with role = "diagnostic" (e.g. an oracle) are allowed
    postprocess: bool = True  # unused: evaluation rows always carry dice (headline, none) and dice_post (per-volume 3D LCC)
    # "queries": the folds' query volumes (the verdict). "training": the folds' training volumes, a validation run
    # for choosing settings without the query volumes' Dice; their labels only score, they never enter a model
    score_on: str = "queries"
    # an augmented arm declared as the primary comparison before the run: its tests against the baseline and the
    # controls are adjusted on their own, and gate every other test (None: the best arm, chosen after the run)
    primary: str | None = None
    # the gains in Dice points asked of the primary (or best) arm over the baseline and over each control: the
    # report says whether each was met, and by how much it was missed (None: no target)
    target_over_baseline: float | None = None
    target_over_control: float | None = None

    def __post_init__(self) -> None:
        if self.score_on not in SCORE_ON:
            raise ConfigError(f"[protocol] score_on = {self.score_on!r}; valid values are {list(SCORE_ON)}")
        if self.setting not in SETTINGS:
            raise ConfigError(f"[protocol] setting = {self.setting!r}; valid values are {list(SETTINGS)}")
        bad = [p for p in self.protocols if p not in PROTOCOLS]
        if bad or not self.protocols:
            raise ConfigError(f"[protocol] protocols = {list(self.protocols)}; choose from {list(PROTOCOLS)}")
        for key, hint in (("folds", "leave folds out for every fold"), ("classes", "leave classes out for every class"),
                          ("seeds", "give at least one seed")):
            if getattr(self, key) == ():
                raise ConfigError(f"[protocol] {key} = []; {hint}")
        for key in ("folds", "seeds"):
            negative = [v for v in getattr(self, key) or () if v < 0]
            if negative:
                raise ConfigError(f"[protocol] {key} = {list(getattr(self, key))}; {negative} are negative, "
                                  f"expected values >= 0")
        for key in ("protocols", "folds", "classes", "seeds"):
            _no_repeats(f"[protocol] {key}", getattr(self, key) or ())
        for key in ("target_over_baseline", "target_over_control"):
            value = getattr(self, key)
            if value is not None and not is_dice_gain(value):
                raise ConfigError(f"[protocol] {key} = {value}; it is a gain in Dice points, in [0, 100]")


@dataclass(frozen=True)
class SynthesisConfig:
    n_pairs: int = 16  # synthetic pairs per fold, class and source
    in_training: bool = True  # fine-tune on the novel class's enlarged support pool
    finetune_steps: int = 100  # the same for every arm, real-only included
    at_test: bool = False  # also add the pairs to the support set at test time (off: they enter by fine-tuning)
    max_test_supports: int = 8  # synthetic pairs of each source added at test time, at most
    filter_dice: float = 0.0  # keep only pairs whose mask the real-data segmenter recovers with this Dice (0: all)
    synthetic_share: float | None = None  # share of each fine-tuning batch drawn from the synthetic pairs (None:
    #                                       uniform over the pooled real and synthetic pairs)

    def __post_init__(self) -> None:
        for key in ("n_pairs", "finetune_steps"):
            if getattr(self, key) < 1:
                raise ConfigError(f"[synthesis] {key} = {getattr(self, key)}; it must be >= 1")
        if self.synthetic_share is not None and not 0.0 <= self.synthetic_share < 1.0:
            raise ConfigError(f"[synthesis] synthetic_share = {self.synthetic_share}; it is the share of each "
                              f"fine-tuning batch drawn from the synthetic pairs, in [0, 1) (the real supports "
                              f"keep the rest), or leave it out to sample the pooled pairs uniformly")
        _check_pair_use("[synthesis]", self.filter_dice, self.max_test_supports)


@dataclass(frozen=True)
class Arm:
    """One arm of the ablation: a named override of the base config. It names the sources of synthetic
    pairs it adds to the real supports and may override how they enter (unset fields keep [synthesis]).

    `role` says what the arm is for; the name is only a label. baseline: the real supports alone, which
    every other arm is tested against (exactly one); control: an augmentation the generator arms must beat
    (classical); augmented: an arm under test; diagnostic: an arm that is not an honest method (e.g. an
    oracle), allowed only in a diagnostic run ([protocol] diagnostic = true). Left out in the TOML, the role
    is inferred when the config is read (`infer_roles`), never later from the name.

    `teacher` names the arm whose fine-tuned model relabels this arm's relabelled sources (default: the
    baseline arm's). Naming an augmented arm is a round of self-training: a model that learned from pairs
    relabels the candidates again. The teacher is never a diagnostic arm, so the masks stay label-free.
    """

    name: str
    sources: tuple[str, ...] = ()
    role: str | None = None
    filter_dice: float | None = None
    in_training: bool | None = None
    at_test: bool | None = None
    max_test_supports: int | None = None
    teacher: str | None = None  # the arm whose model relabels this arm's relabelled sources (None: the baseline)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("[[arms]] name = ''; every arm needs a name")
        if self.role is not None and self.role not in ROLES:
            raise ConfigError(f"[arms.{self.name}] role = {self.role!r}; valid roles are {list(ROLES)}")
        if self.role == "baseline" and self.sources:
            raise ConfigError(f"[arms.{self.name}] role = 'baseline' with sources = {list(self.sources)}; the "
                              f"baseline uses the real supports alone: sources = []")
        _no_repeats(f"[arms.{self.name}] sources", self.sources)
        _check_pair_use(f"[arms.{self.name}]", self.filter_dice, self.max_test_supports)

    def synthesis(self, base: SynthesisConfig) -> SynthesisConfig:
        """The [synthesis] settings this arm runs with."""
        overrides = {k: getattr(self, k) for k in ("filter_dice", "in_training", "at_test", "max_test_supports")
                     if getattr(self, k) is not None}
        return dataclasses.replace(base, **overrides)


EXECUTORS = ("local", "slurm")
SLURM_CLUSTERS = ("slurm", "local", "debug")  # submitit's backends: a real cluster, local processes, in-process


@dataclass(frozen=True)
class SlurmConfig:
    """[run.slurm]: what each unit's job asks of the cluster (executor = "slurm")."""

    partition: str | None = None  # None: the cluster's default partition
    time_min: int = 240  # wall time per unit job
    cpus_per_task: int = 1
    gpus_per_node: int = 0
    mem_gb: float = 8.0
    cluster: str = "slurm"  # "local" or "debug" run the same code path on this machine (tests, dry runs)

    def __post_init__(self) -> None:
        if self.cluster not in SLURM_CLUSTERS:
            raise ConfigError(f"[run.slurm] cluster = {self.cluster!r}; valid values are {list(SLURM_CLUSTERS)}")
        for key in ("time_min", "cpus_per_task", "gpus_per_node", "mem_gb"):
            low = 0 if key == "gpus_per_node" else 1
            if getattr(self, key) < low:
                raise ConfigError(f"[run.slurm] {key} = {getattr(self, key)!r}; it must be >= {low}")


@dataclass(frozen=True)
class RunConfig:
    out: str = "runs/experiment"
    cache: str = ".cache/supportforge"
    jobs: int = 1
    threads: int = 0  # torch threads per process (0: torch's default); 1 with jobs = cores is fastest on a CPU
    cpu: bool = True  # accelerate's cpu flag; false lets it take a GPU
    overlays: int = 1  # query slices drawn per arm, model and class in the report
    executor: str = "local"  # "local": units in this machine's processes (`jobs`); "slurm": one submitit job per unit
    retries: int = 1  # executor = "slurm": resubmissions of a unit whose job failed, before it is reported
    slurm: SlurmConfig = SlurmConfig()

    def __post_init__(self) -> None:
        if self.executor not in EXECUTORS:
            raise ConfigError(f"[run] executor = {self.executor!r}; valid values are {list(EXECUTORS)}")
        if self.retries < 0:
            raise ConfigError(f"[run] retries = {self.retries}; it must be >= 0")
        for key, low in (("jobs", 1), ("threads", 0), ("overlays", 0)):
            if getattr(self, key) < low:
                raise ConfigError(f"[run] {key} = {getattr(self, key)}; it must be >= {low}")
        for key, example in (("out", "runs/experiment"), ("cache", ".cache/supportforge")):
            _check_output_folder(key, getattr(self, key), example)


@dataclass(frozen=True)
class ExperimentConfig:
    name: str
    data: DataConfig
    protocol: ProtocolConfig = ProtocolConfig()
    models: tuple[str, ...] = MODELS
    segment: dict[str, Any] = field(default_factory=dict)  # overrides of the segmenter's training config
    generators: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> overrides of its config
    synthesis: SynthesisConfig = SynthesisConfig()
    arms: tuple[Arm, ...] = (Arm("real-only", role="baseline"),)
    run: RunConfig = RunConfig()

    def __post_init__(self) -> None:
        _no_repeats("models", self.models)
        check_roles(self.arms, diagnostic=self.protocol.diagnostic)
        check_label_sources(self.arms, score_on=self.protocol.score_on)
        check_primary(self.arms, self.protocol.primary)
        check_teachers(self.arms)
        if self.data.path is None:
            return
        data = Path(self.data.path).resolve()
        for key in ("out", "cache"):
            folder = Path(getattr(self.run, key)).resolve()
            if folder.is_relative_to(data):
                raise ConfigError(f"[run] {key} = {getattr(self.run, key)!r} lies inside the data folder "
                                  f"{self.data.path!r}; SupportForge never writes into a data folder: choose another")

    @property
    def sources(self) -> tuple[str, ...]:
        """Every source of synthetic pairs some arm uses, in a stable order."""
        return tuple(sorted({s for arm in self.arms for s in arm.sources}))


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """TOML values into the annotated type: lists to tuples, ints to floats, with clear errors."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where} = {value!r}; expected a list")
        return tuple(_coerce(v, args[0], where) for v in value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise ConfigError(f"{where} = {value!r}; expected {hint.__name__}")
    return value


def build(cls: type, raw: dict, section: str) -> Any:
    """A frozen dataclass from a TOML table: unknown keys and bad values fail with the valid choices."""
    if not isinstance(raw, dict):
        raise ConfigError(f"[{section}] must be a table, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(f"[{section}] unknown key(s) {unknown}; valid keys are {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    values = {k: _coerce(v, hints[k], f"[{section}] {k}") for k, v in raw.items()}
    try:
        return cls(**values)
    except ConfigError:
        raise
    except (TypeError, ValueError) as err:
        raise ConfigError(f"[{section}] {err}") from None


def parse(raw: dict, *, source: str = "config") -> ExperimentConfig:
    """Validate a parsed TOML document into an ExperimentConfig."""
    known = ("name", "data", "protocol", "models", "segment", "generators", "synthesis", "arms", "run")
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{source}: unknown section(s) or key(s) {unknown}; valid ones are {list(known)}")
    if "data" not in raw:
        raise ConfigError(f"{source}: missing [data] section (path = the folder of volumes, or phantom = true)")
    _check_shapes(raw, source)
    models = _coerce(raw.get("models", list(MODELS)), tuple[str, ...], "models")
    bad = [m for m in models if m not in MODELS]
    if bad or not models:
        raise ConfigError(f"{source}: models = {list(models)}; choose from {list(MODELS)}")
    _check_phantom_keys(raw["data"])
    generators = raw.get("generators", {})
    _check_stage_sections(raw, source)
    _check_source_inputs(generators, source)
    arms = tuple(build(Arm, a, f"arms.{a.get('name', i)}") for i, a in enumerate(raw.get("arms", [{"name": "real-only"}])))
    _check_arms(arms, generators, source)
    arms = infer_roles(arms, source)
    return ExperimentConfig(
        name=str(raw.get("name", Path(source).stem)), data=build(DataConfig, raw["data"], "data"),
        protocol=build(ProtocolConfig, raw.get("protocol", {}), "protocol"), models=models,
        segment=dict(raw.get("segment", {})), generators={k: dict(v) for k, v in generators.items()},
        synthesis=build(SynthesisConfig, raw.get("synthesis", {}), "synthesis"), arms=arms,
        run=_run_config(raw.get("run", {})))


def _run_config(raw: dict) -> RunConfig:
    """[run] with its nested [run.slurm] table."""
    if not isinstance(raw, dict) or "slurm" not in raw:
        return build(RunConfig, raw, "run")
    slurm = build(SlurmConfig, raw["slurm"], "run.slurm")
    return dataclasses.replace(build(RunConfig, {k: v for k, v in raw.items() if k != "slurm"}, "run"), slurm=slurm)


def _check_shapes(raw: dict, source: str) -> None:
    """Sections are tables and [[arms]] an array of tables, before anything reads them as such."""
    for section in ("data", "protocol", "segment", "generators", "synthesis", "run"):
        if not isinstance(raw.get(section, {}), dict):
            raise ConfigError(f"{source}: [{section}] must be a table, got {raw[section]!r}")
    for name, table in raw.get("generators", {}).items():
        if not isinstance(table, dict):
            raise ConfigError(f"{source}: [generators.{name}] must be a table, got {table!r}")
    arms = raw.get("arms", [])
    if not isinstance(arms, list) or not all(isinstance(a, dict) for a in arms):
        raise ConfigError(f"{source}: arms = {arms!r}; write each arm as an [[arms]] table with name and sources")


def _check_phantom_keys(data: dict) -> None:
    """phantom_* keys only make sense with phantom = true; elsewhere they would be silently ignored."""
    stray = sorted(k for k in data if k.startswith("phantom_")) if not data.get("phantom") else []
    if stray:
        raise ConfigError(f"[data] {stray} are set but phantom is not true; remove them or set phantom = true")


def _check_stage_sections(raw: dict, source: str) -> None:
    """[segment] and [generators.NAME] against the stages' own config dataclasses."""
    from segment.config import SegmenterConfig

    kinds = {name: gen.config for name, gen in (GENERATORS | VOLUME_SOURCES | REFINERS).items()}
    runner_owned = {"model", "resolution", "seed", "cpu"}  # set per stage run from [data], [protocol], [run]
    sections = [("segment", SegmenterConfig, raw.get("segment", {}))]
    for name, table in raw.get("generators", {}).items():
        if name not in kinds:
            raise ConfigError(f"{source}: [generators.{name}]: unknown generator; known: {sorted(kinds)}")
        sections.append((f"generators.{name}", kinds[name], table))
    for section, cls, table in sections:
        owned = sorted(runner_owned & set(table))
        if owned:
            raise ConfigError(f"{source}: [{section}] {owned} are set by the runner from [data], [protocol] "
                              f"and [run]; remove them")
        build(cls, table, section)


def _check_source_inputs(generators: dict, source: str) -> None:
    """A source that learns from another's pairs or model needs that one's [generators.NAME] section: a
    generator whose `finetune_on` names a pair source, and a refiner (its pair source and its generator,
    which must keep the masks)."""
    for name, table in generators.items():
        where = f"generators.{name}"
        needs: list[tuple[str, str]] = []
        if name in GENERATORS:
            added = GENERATORS[name].finetune_source(build(GENERATORS[name].config, table, where))
            needs = [(f"finetune_on = {added!r}", added)] if added else []
        elif name in REFINERS:
            ref = REFINERS[name]
            needs = [(f"it refines {ref.pairs_from!r} pairs", ref.pairs_from),
                     (f"it denoises with the {ref.model_from!r} generator", ref.model_from)]
        for why, other in needs:
            if other not in generators:
                raise ConfigError(f"{source}: [{where}] {why}, but there is no [generators.{other}] section; "
                                  f"add one (it may be empty)")
        if name in REFINERS:
            _check_refiner_model(name, generators, source)


def _check_refiner_model(name: str, generators: dict, source: str) -> None:
    """A refiner's generator, as its section configures it, must suit the refiner (e.g. keep the masks)."""
    ref = REFINERS[name]
    model = build(GENERATORS[ref.model_from].config, generators[ref.model_from], f"generators.{ref.model_from}")
    try:
        ref.check_model(model)
    except ValueError as err:
        raise ConfigError(f"{source}: [generators.{name}] {err}") from None


def infer_roles(arms: tuple[Arm, ...], source: str = "config") -> tuple[Arm, ...]:
    """Every arm with its role: the TOML's where given, else inferred here, once, from the sources.

    No sources: baseline, if no other arm is (or may become) the baseline; sources = ["classical"]: control;
    anything else: augmented. Two arms without sources and without roles are ambiguous: the error asks
    for roles instead of guessing by name.
    """
    given = [a for a in arms if a.role == "baseline"]
    bare = [a for a in arms if a.role is None and not a.sources]
    if not given and len(bare) > 1:
        raise ConfigError(f"{source}: arms {[a.name for a in bare]} have no sources and no role; say which one "
                          f"is the baseline: role = \"baseline\" (roles: {list(ROLES)})")

    def role(arm: Arm) -> str:
        if arm.role is not None:
            return arm.role
        if not arm.sources:
            return "augmented" if given else "baseline"
        return "control" if arm.sources == (CLASSICAL,) else "augmented"

    return tuple(dataclasses.replace(a, role=role(a)) for a in arms)


def check_roles(arms: tuple[Arm, ...], *, diagnostic: bool) -> None:
    """Names are unique labels, exactly one arm is the baseline, and diagnostic arms only in diagnostic runs."""
    names = [a.name for a in arms]
    _no_repeats("arm names", tuple(names))
    missing = [a.name for a in arms if a.role is None]
    if missing:
        raise ConfigError(f"arms {missing} have no role; give each one of {list(ROLES)}")
    baselines = [a.name for a in arms if a.role == "baseline"]
    if len(baselines) != 1:
        raise ConfigError(f"arms: {len(baselines)} baseline arm(s) {baselines}; exactly one arm has role = "
                          f"\"baseline\" (the real supports alone, sources = []): every gain is measured against it")
    diagnostics = [a.name for a in arms if a.role == "diagnostic"]
    if diagnostics and not diagnostic:
        raise ConfigError(f"arms {diagnostics} have role = \"diagnostic\" outside a diagnostic run; set "
                          f"[protocol] diagnostic = true, or give them another role")


def check_primary(arms: tuple[Arm, ...], primary: str | None) -> None:
    """A declared primary comparison names an augmented arm: the question is whether synthetic pairs help."""
    augmented = [a.name for a in arms if a.role == "augmented"]
    if primary is not None and primary not in augmented:
        raise ConfigError(f"[protocol] primary = {primary!r} is not an augmented arm of this config; "
                          f"choose one of {augmented}" if augmented else
                          f"[protocol] primary = {primary!r}, but this config has no augmented arm to declare")


def check_teachers(arms: tuple[Arm, ...]) -> None:
    """A named teacher is another arm of this config, not a diagnostic one (its model learned true labels), the
    arm has a source it relabels, and following teachers never comes back to an arm (a model cannot teach
    the pairs it learns from)."""
    by_name = {a.name: a for a in arms}
    taught = [a for a in arms if a.teacher is not None]
    for arm in taught:  # every name first, so that following the chains below meets only known arms
        where = f"[arms.{arm.name}] teacher = {arm.teacher!r}"
        if arm.teacher not in by_name:
            raise ConfigError(f"{where} is not an arm of this config; choose one of "
                              f"{[a.name for a in arms if a.name != arm.name]}")
        if by_name[arm.teacher].role == "diagnostic":
            raise ConfigError(f"{where} is a diagnostic arm: its model learned the training volumes' true labels, "
                              f"which would leak into the relabelled masks; name a baseline, control or augmented arm")
        relabelled = [s for s in arm.sources if s in VOLUME_SOURCES and VOLUME_SOURCES[s].relabelled]
        if not relabelled:
            raise ConfigError(f"{where}, but its sources {list(arm.sources)} hold no relabelled source "
                              f"({[n for n, s in VOLUME_SOURCES.items() if s.relabelled]}); drop the teacher")
    for arm in taught:
        teacher_chain(arms, arm)


def teacher_chain(arms: tuple[Arm, ...], arm: Arm) -> tuple[Arm, ...]:
    """The arms whose models teach `arm`'s, nearest first: its teacher, that arm's teacher, and so on (empty:
    the baseline teaches). Teachers that come back to an arm are a config error."""
    by_name, chain, name = {a.name: a for a in arms}, [arm.name], arm.teacher
    while name is not None:
        if name in chain:
            raise ConfigError(f"[arms.{arm.name}] teacher = {arm.teacher!r}: the teachers form a loop "
                              f"{' -> '.join([*chain, name])}; a model cannot relabel the pairs it is fine-tuned on")
        chain.append(name)
        name = by_name[name].teacher
    return tuple(by_name[n] for n in chain[1:])


def check_label_sources(arms: tuple[Arm, ...], *, score_on: str = "queries") -> None:
    """A source that reads the training volumes' true labels (the oracle) only in a diagnostic arm, and never
    in a run scored on those training volumes (it would be scored on the labels it was tuned on)."""
    for arm in arms:
        labelled = [s for s in arm.sources if s in VOLUME_SOURCES and VOLUME_SOURCES[s].reads_labels]
        if labelled and score_on == "training":
            raise ConfigError(f"[arms.{arm.name}] sources = {list(arm.sources)}: {labelled} read the training "
                              f"volumes' true labels, and [protocol] score_on = \"training\" scores those volumes; "
                              f"drop the arm from the validation run")
        if labelled and arm.role != "diagnostic":
            raise ConfigError(f"[arms.{arm.name}] sources = {list(arm.sources)} with role = {arm.role!r}: {labelled} "
                              f"read the training volumes' true labels, which Setting 1 forbids; such an arm needs "
                              f"role = \"diagnostic\" and [protocol] diagnostic = true")


def _check_arms(arms: tuple[Arm, ...], generators: dict, source: str) -> None:
    names = [a.name for a in arms]
    if len(set(names)) != len(names):
        raise ConfigError(f"{source}: arm names repeat: {names}")
    sectionless = [n for n, s in VOLUME_SOURCES.items() if not s.needs_section]
    known = (CLASSICAL, *sorted(set(generators) | set(sectionless)))
    for arm in arms:
        for s in arm.sources:
            if s not in known:
                raise ConfigError(f"{source}: arm {arm.name!r} names unknown generator {s!r}; known: {list(known)} "
                                  f"(a generator needs a [generators.{s}] section)")
            owner = VOLUME_SOURCES[s].model_from if s in VOLUME_SOURCES else None
            if owner and owner not in generators:
                raise ConfigError(f"{source}: arm {arm.name!r} uses {s!r}, which samples the {owner!r} model, but "
                                  f"there is no [generators.{owner}] section; add one (it may be empty)")


def load(path: str | Path, *, data: str | None = None,
         overrides: dict[str, dict[str, Any]] | None = None) -> ExperimentConfig:
    """Read and validate an experiment TOML; `data` overrides [data] path and turns the phantom off (the CLI's
    --data); `overrides` replaces keys of sections, e.g. {"run": {"jobs": 2}}, before any check (the CLI's
    --folds, --seeds, --jobs, --out and --cache)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{path}: not valid TOML ({err})") from None
    if data is not None:  # a data folder replaces the phantom: drop its keys
        table = raw.setdefault("data", {})
        if isinstance(table, dict):
            raw["data"] = {k: v for k, v in table.items() if k != "phantom" and not k.startswith("phantom_")}
            raw["data"]["path"] = data
    for section, values in (overrides or {}).items():
        table = raw.setdefault(section, {})
        if isinstance(table, dict):  # a malformed section is reported by parse
            table.update(values)
    return parse(raw, source=str(path))


def as_dict(obj: Any) -> Any:
    """A JSON-able view of a config (for cache keys and the run folder's resolved config)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: as_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {str(k): as_dict(v) for k, v in sorted(obj.items())}
    if isinstance(obj, list | tuple):
        return [as_dict(v) for v in obj]
    return obj
