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
from pathlib import Path

from pipelines.cache import StageCache
from pipelines.config import ConfigError, ExperimentConfig, as_dict
from pipelines.executors import EXECUTORS, UnitArgs, check_backend
from pipelines.stages.base import NotCached, StageEntry, StageRunner, log_record, stage_classes
from pipelines.stages.report import provenance, publish
from pipelines.stages.unit import report_stage, run_unit, superpixel_stage
from segment.data.integrity import relative, write_atomically
from segment.data.phantom import PHANTOM_VERSION, write_phantom
from segment.data.protocol import Fold, make_folds
from segment.data.slices import PreparedData, prepare
from segment.data.superpixels import superpixel_folder
from segment.data.volumes import resolve_spec

STAGES = ("prepare", *stage_classes())  # what --force accepts; a stage's version lives on its class

__all__ = ["NotCached", "StageRunner", "UnitsFailed", "load_data", "run_experiment"]


class UnitsFailed(RuntimeError):
    """No unit of the experiment finished, so there is nothing to report."""


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


def _unit(cfg: ExperimentConfig, fold: Fold, seed: int, classes: tuple[str, ...], superpixels: StageEntry,
          force: frozenset[str], out: str, data: PreparedData | None = None,
          cached_only: bool = False) -> tuple[list[dict], list[dict], dict]:
    """One (fold, seed) unit in its own process or in the caller's: every stage from generators to scores."""
    log = logging.getLogger("supportforge")
    if not log.handlers:
        log = setup_logging(Path(out))
    if cfg.run.threads > 0 and not cached_only:
        import torch  # a fully cached run never loads it

        torch.set_num_threads(cfg.run.threads)
    runner = StageRunner(StageCache(cfg.run.cache), force, log, cached_only=cached_only)
    data = data or load_data(cfg)
    rows, extras = run_unit(cfg, data, fold, seed, classes, superpixels, runner)
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
    sp = superpixel_stage(cfg, data)
    sp_entry = runner(sp)
    folders = [_cache_path(data.path, cfg), _cache_path(superpixel_folder(data, sp.params, cfg.run.cache), cfg)]

    units = [(fold, seed) for fold in folds for seed in cfg.protocol.seeds]
    rows, extras = [], []
    args = [UnitArgs(cfg, fold, seed, classes, sp_entry, frozenset(force), str(out)) for fold, seed in units]
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
    run_provenance = provenance(cfg.run.cpu)
    for f in failed:
        log.error("unit fold %d seed %d FAILED after %d attempt(s) (jobs %s); its rows are missing. Log tail:\n%s",
                  f.fold, f.seed, f.attempts, ", ".join(f.job_ids), f.log_tail)
    if not extras:  # nothing to report; the run folder still lists what failed
        (out / "stages.json").write_text(json.dumps({"records": runner.records, "failed_units": failed_units,
                                                     "provenance": run_provenance, "config": as_dict(cfg)}, indent=2))
        raise UnitsFailed(f"every unit failed: {[(f.fold, f.seed) for f in failed]}; see {out / 'run.log'}")
    report_dir = runner(report_stage(cfg, data, rows, extras, failed_units=failed_units)).path
    publish(report_dir, out)
    summary = _stage_summary(runner.records)
    for stage, counts in summary.items():
        log.info("stage %-18s ran %d, cached %d", stage, counts["ran"], counts["cached"])
    (out / "stages.json").write_text(json.dumps({"records": runner.records, "summary": summary, "folders": folders,
                                                 "failed_units": failed_units, "provenance": run_provenance,
                                                 "config": as_dict(cfg)}, indent=2))
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
