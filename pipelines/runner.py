"""The experiment runner: chains the stages, caches each stage run, and gathers the ablation rows.

Stages, in order: prepare (slices) -> superpixels -> generator (pretrain, then fine-tune per class) ->
synthesis (per source and class) -> segmenter (base model per model and exclusion set) -> finetune (per
arm and class) -> evaluate (per model, arm and protocol) -> report. Every stage run goes through the
content-addressed `StageCache`; its key holds the stage's own config, the keys of its inputs and the
stage's code version, so a config change re-runs exactly the stages downstream of it; an entry found
damaged is moved aside and run again. Independent (fold, seed) units can run in parallel processes
(`jobs`), which share the cache through its locks and end when the run that started them dies. The
run folder's `stages.json` records every stage entry and the slice and superpixel folders the run used,
with whether each ran or came from the cache, and in which process.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from pipelines import stages
from pipelines.cache import StageCache, stage_key
from pipelines.config import ConfigError, ExperimentConfig, as_dict
from pipelines.executors import EXECUTORS, UnitArgs, check_backend
from segment.integrity import relative, write_atomically
from segment.phantom import PHANTOM_VERSION, write_phantom
from segment.protocol import Fold, make_folds
from segment.slices import PreparedData, prepare
from segment.superpixels import superpixel_folder
from segment.volumes import resolve_spec

# Bump a stage's version when its code changes what it writes: every entry of it, and downstream, re-runs.
STAGE_VERSIONS = {"superpixels": "1", "generator-pretrain": "2", "generator": "2", "synthesis": "2",
                  "segmenter": "1", "quality": "2", "finetune": "1", "evaluate": "2", "report": "4"}
STAGES = ("prepare", *STAGE_VERSIONS)


class NotCached(Exception):
    """A stage entry is missing while the runner was asked to use cached entries only."""


class UnitsFailed(RuntimeError):
    """No unit of the experiment finished, so there is nothing to report."""


def _not_cached(stage: str):
    def produce(folder: Path) -> None:
        raise NotCached(stage)
    return produce


def log_record(log: logging.Logger, r: dict) -> None:
    log.info("%-18s %-44s %s %s", r["stage"], r["label"], "ran" if r["ran"] else "cached", f"({r['seconds']} s, {r['key']})")


@dataclass
class StageRunner:
    """Runs one stage entry through the cache, logs whether it ran or was cached, and keeps a record.

    With `cached_only`, a missing (or bad) entry raises `NotCached` instead of running, and nothing is
    logged: the runner uses it to find, in-process and cheaply, the units that need no work at all.
    Each record carries the pid of the process that ran it (a pool worker's with `jobs` > 1).
    """

    cache: StageCache
    force: frozenset[str]
    log: logging.Logger
    records: list[dict] = field(default_factory=list)
    cached_only: bool = False

    def __call__(self, stage: str, label: str, config: dict, inputs: dict[str, str], produce) -> tuple[Path, str]:
        key = stage_key(stage, STAGE_VERSIONS[stage], config, inputs)
        if self.cached_only and not self.cache.done(stage, key):
            raise NotCached(stage)
        if stage in self.force and self.cache.done(stage, key):
            self.cache.remove(stage, key)
        start = time.perf_counter()
        if self.cached_only:  # an entry that the hash check finds bad is moved aside, then built by a unit
            produce = _not_cached(stage)
        entry = self.cache.run(stage, key, produce, meta={"label": label, "config": config, "inputs": inputs})
        record = {"stage": stage, "label": label, "key": key, "ran": entry.ran,
                  "seconds": round(time.perf_counter() - start, 2), "pid": os.getpid()}
        if not self.cached_only:
            log_record(self.log, record)
        self.records.append(record)
        return entry.path, key


def setup_logging(out: Path) -> logging.Logger:
    """Log to the run folder's `run.log` and to stderr."""
    out.mkdir(parents=True, exist_ok=True)
    log = logging.getLogger("supportforge")
    log.setLevel(logging.INFO)
    log.handlers.clear()
    for handler in (logging.FileHandler(out / "run.log"), logging.StreamHandler()):
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        log.addHandler(handler)
    return log


def phantom_folder(cfg: ExperimentConfig) -> Path:
    """The built-in phantom of `cfg`, built once under the cache at a path named by a hash of everything
    that decides its files, and written atomically. A data folder is never written: only this one."""
    d = cfg.data
    params = {"version": PHANTOM_VERSION, "volumes": d.phantom_volumes, "size": d.phantom_size, "seed": d.phantom_seed}
    key = hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cfg.run.cache) / "phantom" / f"phantom-{key}"
    if not (folder / "meta.json").is_file():
        write_atomically(folder, lambda tmp: write_phantom(tmp, n_volumes=d.phantom_volumes, size=d.phantom_size,
                                                           seed=d.phantom_seed), params, root=Path(cfg.run.cache))
    return folder


def load_data(cfg: ExperimentConfig) -> PreparedData:
    """Check the config against the dataset spec, then prepare the slices. Only the phantom (under the
    cache) is written before the checks pass; a data folder is only ever read."""
    path = phantom_folder(cfg) if cfg.data.phantom else Path(cfg.data.path)
    spec = resolve_spec(path, cfg.data.spec)
    unknown = [c for c in cfg.protocol.classes or () if c not in spec.classes]
    if unknown:
        raise ConfigError(f"[protocol] classes: {unknown} are not classes of spec {spec.name!r} ({list(spec.classes)})")
    bad = [k for k in cfg.protocol.folds or () if not 0 <= k < spec.n_folds]
    if bad:
        raise ConfigError(f"[protocol] folds: {bad} out of range; spec {spec.name!r} has {spec.n_folds} folds")
    return prepare(spec, path, resolution=cfg.data.resolution, cache_dir=cfg.run.cache)


def select(cfg: ExperimentConfig, data: PreparedData) -> tuple[list[Fold], tuple[str, ...]]:
    """The folds and classes the config asks for (checked by `load_data`)."""
    folds = make_folds(data.ids, data.spec.n_folds)
    wanted = cfg.protocol.folds if cfg.protocol.folds is not None else tuple(range(len(folds)))
    return [folds[k] for k in wanted], tuple(cfg.protocol.classes or data.spec.classes)


def _unit(cfg: ExperimentConfig, fold: Fold, seed: int, classes: tuple[str, ...], sp_key: str,
          force: frozenset[str], out: str, data: PreparedData | None = None,
          cached_only: bool = False) -> tuple[list[dict], list[dict], dict]:
    """One (fold, seed) unit in its own process or in the caller's: every stage from generators to scores."""
    log = logging.getLogger("supportforge")
    if not log.handlers:
        log = setup_logging(Path(out))
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    runner = StageRunner(StageCache(cfg.run.cache), force, log, cached_only=cached_only)
    data = data or load_data(cfg)
    rows, extras = stages.run_unit(cfg, data, fold, seed, classes, sp_key, runner)
    return rows, runner.records, extras


def run_experiment(cfg: ExperimentConfig, *, force: tuple[str, ...] = ()) -> dict:
    """Run (or read from the cache) every stage of the experiment and write the report to `cfg.run.out`."""
    bad = [s for s in force if s not in STAGES]
    if bad:
        raise ConfigError(f"--force {bad[0]!r}: not a stage; stages are {list(STAGES)}")
    check_backend(cfg.run)
    out = Path(cfg.run.out)
    start = time.perf_counter()
    data = load_data(cfg)  # validates the data before anything is written under the run folder
    if "prepare" in force:
        data = prepare(data.spec, data.source, resolution=data.resolution, cache_dir=cfg.run.cache, force=True)
    folds, classes = select(cfg, data)
    log = setup_logging(out)
    log.info("experiment %s: %d fold(s), seeds %s, classes %s, arms %s", cfg.name, len(folds),
             list(cfg.protocol.seeds), list(classes), [a.name for a in cfg.arms])
    runner = StageRunner(StageCache(cfg.run.cache), frozenset(force), log)
    runner.records.append({"stage": "prepare", "label": data.spec.name, "key": data.key, "ran": data.built,
                           "seconds": round(time.perf_counter() - start, 2), "pid": os.getpid()})
    log_record(log, runner.records[-1])
    _, sp_key = stages.superpixel_stage(cfg, data, runner)
    folders = [_cache_path(data.path, cfg), _cache_path(superpixel_folder(data, stages.superpixel_params(cfg),
                                                                          cfg.run.cache), cfg)]

    units = [(fold, seed) for fold in folds for seed in cfg.protocol.seeds]
    rows, extras = [], []
    args = [UnitArgs(cfg, fold, seed, classes, sp_key, frozenset(force), str(out)) for fold, seed in units]
    results = [None] * len(args)
    for i, a in enumerate(args if not force else []):  # units with nothing to do need no worker process
        try:
            results[i] = _unit(*a, data=data, cached_only=True)
            for record in results[i][1]:
                log_record(log, record)
        except NotCached:
            pass
    todo = [i for i, r in enumerate(results) if r is None]
    done, failed = EXECUTORS[cfg.run.executor](_unit, [args[i] for i in todo], cfg.run, data)
    for i, result in zip(todo, done):
        results[i] = result
    for unit_rows, records, unit_extras in (r for r in results if r is not None):  # a failed unit has no rows
        rows += unit_rows
        runner.records += records
        extras.append(unit_extras)
    failed_units = [f.as_json() for f in failed]
    for f in failed:
        log.error("unit fold %d seed %d FAILED after %d attempt(s) (jobs %s); its rows are missing. Log tail:\n%s",
                  f.fold, f.seed, f.attempts, ", ".join(f.job_ids), f.log_tail)
    if not extras:  # nothing to report; the run folder still lists what failed
        (out / "stages.json").write_text(json.dumps({"records": runner.records, "failed_units": failed_units,
                                                     "config": as_dict(cfg)}, indent=2))
        raise UnitsFailed(f"every unit failed: {[(f.fold, f.seed) for f in failed]}; see {out / 'run.log'}")
    report_dir = stages.report_stage(cfg, data, rows, extras, runner, failed_units=failed_units)
    stages.publish(report_dir, out)
    summary = _stage_summary(runner.records)
    for stage, counts in summary.items():
        log.info("stage %-18s ran %d, cached %d", stage, counts["ran"], counts["cached"])
    (out / "stages.json").write_text(json.dumps({"records": runner.records, "summary": summary, "folders": folders,
                                                 "failed_units": failed_units, "config": as_dict(cfg)}, indent=2))
    log.info("report: %s", out / "report.md")
    return {"out": out, "records": runner.records, "summary": summary, "failed_units": failed_units}


def _cache_path(folder: Path, cfg: ExperimentConfig) -> str:
    """A slice or superpixel folder as `slices/NAME`: what `cache gc --keep` keeps for this run."""
    return relative(Path(cfg.run.cache), Path(folder)).as_posix()


def _stage_summary(records: list[dict]) -> dict:
    summary: dict[str, dict[str, int]] = {}
    for r in records:
        counts = summary.setdefault(r["stage"], {"ran": 0, "cached": 0})
        counts["ran" if r["ran"] else "cached"] += 1
    return summary
