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

import ctypes
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from pipelines import stages
from pipelines.cache import StageCache, stage_key
from pipelines.config import ConfigError, ExperimentConfig, as_dict
from segment.phantom import write_phantom
from segment.integrity import relative
from segment.protocol import Fold, make_folds
from segment.slices import PreparedData, prepare
from segment.superpixels import superpixel_folder
from segment.volumes import resolve_spec

# Bump a stage's version when its code changes what it writes: every entry of it, and downstream, re-runs.
STAGE_VERSIONS = {"superpixels": "1", "generator-pretrain": "1", "generator": "1", "synthesis": "1",
                  "segmenter": "1", "quality": "2", "finetune": "1", "evaluate": "1", "report": "3"}
STAGES = ("prepare", *STAGE_VERSIONS)
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies


class NotCached(Exception):
    """A stage entry is missing while the runner was asked to use cached entries only."""


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


def load_data(cfg: ExperimentConfig) -> PreparedData:
    """Check the config against the dataset spec, then prepare the slices (writing the phantom first
    where the config asks for it). Nothing is written before the checks pass."""
    path = Path(cfg.data.path)
    if cfg.data.phantom and not (path / "dataset.toml").is_file():
        write_phantom(path, n_volumes=cfg.data.phantom_volumes, size=cfg.data.phantom_size, seed=0)
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
    args = [(cfg, fold, seed, classes, sp_key, frozenset(force), str(out)) for fold, seed in units]
    results = [None] * len(args)
    for i, a in enumerate(args if not force else []):  # units with nothing to do need no worker process
        try:
            results[i] = _unit(*a, data=data, cached_only=True)
            for record in results[i][1]:
                log_record(log, record)
        except NotCached:
            pass
    todo = [i for i, r in enumerate(results) if r is None]
    for i, result in zip(todo, _run_units([args[i] for i in todo], cfg.run.jobs, data)):
        results[i] = result
    for unit_rows, records, unit_extras in results:
        rows += unit_rows
        runner.records += records
        extras.append(unit_extras)
    report_dir = stages.report_stage(cfg, data, rows, extras, runner)
    stages.publish(report_dir, out)
    summary = _stage_summary(runner.records)
    for stage, counts in summary.items():
        log.info("stage %-18s ran %d, cached %d", stage, counts["ran"], counts["cached"])
    (out / "stages.json").write_text(json.dumps({"records": runner.records, "summary": summary, "folders": folders,
                                                 "config": as_dict(cfg)}, indent=2))
    log.info("report: %s", out / "report.md")
    return {"out": out, "records": runner.records, "summary": summary}


def _run_units(args: list[tuple], jobs: int, data: PreparedData) -> list[tuple]:
    """`_unit` of each argument tuple: in a pool of `jobs` spawned processes (each ending with this one),
    or here when one process is asked for or one unit is left."""
    if jobs > 1 and len(args) > 1:
        with ProcessPoolExecutor(jobs, mp_context=mp.get_context("spawn"), initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            return list(tqdm(pool.map(_unit, *zip(*args)), total=len(args), desc="units", unit="unit"))
    return [_unit(*a, data=data) for a in tqdm(args, desc="units", unit="unit")]


def _cache_path(folder: Path, cfg: ExperimentConfig) -> str:
    """A slice or superpixel folder as `slices/NAME`: what `cache gc --keep` keeps for this run."""
    return relative(Path(cfg.run.cache), Path(folder)).as_posix()


def exit_with_parent(parent: int) -> None:
    """Pool worker initializer: end this worker as soon as `parent`, the run that started it, is gone,
    even by kill -9 (the pool cannot tell its workers then, and they would run on for minutes).

    Linux kills the worker itself when its parent dies (prctl PR_SET_PDEATHSIG); elsewhere, and as a
    fallback, a daemon thread polls the parent pid twice a second.
    """
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # it died before prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


def _stage_summary(records: list[dict]) -> dict:
    summary: dict[str, dict[str, int]] = {}
    for r in records:
        counts = summary.setdefault(r["stage"], {"ran": 0, "cached": 0})
        counts["ran" if r["ran"] else "cached"] += 1
    return summary
