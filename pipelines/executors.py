"""Executors: where the runner's independent (fold, seed) units run, chosen by [run] executor.

- `local`: today's behaviour. Units run in this process, or with `jobs > 1` in a pool of spawned processes
  that share the stage cache through its locks. A failing unit stops the run with its error.
- `slurm`: one submitit job per unit, with the partition, time, CPUs, GPUs and memory of [run.slurm].
  submitit writes and submits the batch scripts; [run.slurm] cluster = "local" or "debug" runs the very
  same path on this machine with submitit's local or in-process backend. The runner waits with a
  progress bar over units, then reads each unit's rows back from the stage cache (not from submitit's
  result pickles). A job that fails, is killed or whose node dies is resubmitted up to [run] retries
  times; it resumes from the stage entries the earlier attempt finished. Pre-emption and time-outs are
  requeued by submitit itself (`UnitJob` is checkpointable). A unit that still fails is returned as a
  `UnitFailure` naming its fold and seed with the tail of its job log; the other units go on.

The cache and the run folder must then be on storage that every node sees under the same path.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import multiprocessing as mp
import os
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import submitit
from tqdm import tqdm

from pipelines.config import ConfigError, ExperimentConfig, RunConfig
from pipelines.stages.base import StageEntry
from segment.data.protocol import Fold
from segment.data.slices import PreparedData

UnitResult = tuple[list[dict], list[dict], dict]  # Dice rows, stage records, artifact paths for the report
LOG_TAIL_LINES = 20


class UnitArgs(NamedTuple):
    """The arguments of the runner's unit function, `unit(*args, data=None, cached_only=False)`."""

    cfg: ExperimentConfig
    fold: Fold
    seed: int
    classes: tuple[str, ...]
    superpixels: StageEntry
    force: frozenset[str]
    out: str

    @property
    def name(self) -> str:
        return f"fold{self.fold.index}-seed{self.seed}"


@dataclass(frozen=True)
class UnitFailure:
    """A unit that failed on every attempt: it has no rows, and the run lists it instead of averaging over it."""

    fold: int
    seed: int
    attempts: int
    job_ids: tuple[str, ...]
    log_tail: str  # the last lines of the last attempt's job log (stderr)

    def as_json(self) -> dict:
        return {**dataclasses.asdict(self), "job_ids": list(self.job_ids)}


Outcome = tuple[list[UnitResult | None], list[UnitFailure]]  # results in the order of the units; None: failed
PR_SET_PDEATHSIG = 1  # linux/prctl.h: the signal a process gets when its parent dies

Executor = Callable[[Callable[..., UnitResult], list[UnitArgs], RunConfig, PreparedData], Outcome]


def run_local(unit: Callable[..., UnitResult], units: list[UnitArgs], run: RunConfig,
              data: PreparedData) -> Outcome:
    """Units in this process, or in `run.jobs` spawned processes (each ending with this one); an error in a
    unit propagates."""
    if run.jobs > 1 and len(units) > 1:
        with ProcessPoolExecutor(run.jobs, mp_context=mp.get_context("spawn"), initializer=exit_with_parent,
                                 initargs=(os.getpid(),)) as pool:
            done = list(tqdm(pool.map(unit, *zip(*units)), total=len(units), desc="units", unit="unit"))
    else:
        done = [unit(*a, data=data) for a in tqdm(units, desc="units", unit="unit")]
    return done, []


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


class UnitJob(submitit.helpers.Checkpointable):
    """One unit as a cluster job. It writes its stage records as JSON beside the job logs; its rows stay
    in the stage cache. Checkpointing resubmits it unchanged: the cache is its checkpoint."""

    def __init__(self, unit: Callable[..., UnitResult], args: UnitArgs, records: Path) -> None:
        self.unit, self.args, self.records = unit, args, records

    def __call__(self) -> None:
        _, records, _ = self.unit(*self.args)
        self.records.write_text(json.dumps(records))


def check_backend(run: RunConfig) -> None:
    """Fail before anything is written when [run] asks for Slurm on a machine that cannot submit to it."""
    slurm_here = shutil.which("sbatch") and shutil.which("srun")
    if run.executor == "slurm" and run.slurm.cluster == "slurm" and not slurm_here:
        raise ConfigError('[run] executor = "slurm" with [run.slurm] cluster = "slurm", but sbatch/srun are not on '
                          'PATH; run from a Slurm login node, or set [run.slurm] cluster = "local" to try it here')


def submitit_executor(run: RunConfig, folder: Path, name: str) -> submitit.Executor:
    """submitit's executor for [run.slurm]: the resources every unit job asks for."""
    s = run.slurm
    executor = submitit.AutoExecutor(folder=folder, cluster=s.cluster)
    params = {"name": name, "timeout_min": s.time_min, "cpus_per_task": s.cpus_per_task,
              "gpus_per_node": s.gpus_per_node, "mem_gb": s.mem_gb}
    if s.partition is not None:
        params["slurm_partition"] = s.partition
    executor.update_parameters(**params)
    return executor


def run_slurm(unit: Callable[..., UnitResult], units: list[UnitArgs], run: RunConfig, data: PreparedData, *,
              poll_s: float = 1.0) -> Outcome:
    """Each unit as a submitit job; failed jobs are resubmitted up to `run.retries` times."""
    if not units:
        return [], []
    folder = Path(units[0].out) / "jobs"
    executor = submitit_executor(run, folder, f"supportforge-{units[0].cfg.name}")
    records = [folder / f"{a.name}.records.json" for a in units]
    jobs: dict[int, list] = {i: [] for i in range(len(units))}  # every attempt's job, per unit

    def submit(todo: list[int]) -> None:
        for i in todo:  # a record left by an earlier run must not pass for this attempt's
            records[i].unlink(missing_ok=True)
        with executor.batch():  # one job array on Slurm
            submitted = [executor.submit(UnitJob(unit, units[i], records[i])) for i in todo]
        for i, job in zip(todo, submitted):
            jobs[i].append(job)

    log = logging.getLogger("supportforge")
    results: list[UnitResult | None] = [None] * len(units)
    failures: list[UnitFailure] = []
    pending = list(range(len(units)))
    submit(pending)
    with tqdm(total=len(units), desc="units", unit="unit") as bar:
        while pending:
            finished = [i for i in pending if _finished(jobs[i][-1])]
            retry = []
            for i in finished:
                pending.remove(i)
                results[i] = _collect(unit, units[i], records[i], data)
                if results[i] is None and len(jobs[i]) <= run.retries:
                    log.warning("unit %s: job %s ended before the unit was done; resubmitting (retry %d of %d)",
                                units[i].name, jobs[i][-1].job_id, len(jobs[i]), run.retries)
                    retry.append(i)
                    continue
                if results[i] is None:
                    failures.append(_failure(units[i], jobs[i]))
                bar.update()
            if retry:
                submit(retry)
                pending += retry
            if pending and not finished:
                time.sleep(poll_s)
    return results, failures


def _finished(job: submitit.Job) -> bool:
    """Whether a job has ended, well or not. The debug backend runs the unit inside `done()` and re-raises
    its error there; the stage cache then tells how it went, as for every other backend."""
    try:
        return job.done()
    except Exception:  # noqa: BLE001 - any error of the unit itself
        return True


def _collect(unit: Callable[..., UnitResult], args: UnitArgs, records: Path, data: PreparedData) -> UnitResult | None:
    """A finished unit's rows read back from the stage cache; None when its job left the unit incomplete."""
    from pipelines.stages.base import NotCached

    try:
        rows, cached, extras = unit(*args._replace(force=frozenset()), data=data, cached_only=True)
    except NotCached:
        return None
    ran = json.loads(records.read_text()) if records.is_file() else cached  # what the job itself ran
    return rows, ran, extras


def _failure(args: UnitArgs, attempts: list[submitit.Job]) -> UnitFailure:
    last = attempts[-1]
    try:
        log = last.stderr() or ""
    except OSError:  # the log never reached the shared storage
        log = ""
    tail = "\n".join(log.rstrip().splitlines()[-LOG_TAIL_LINES:]) or f"(no job log at {last.paths.stderr})"
    return UnitFailure(args.fold.index, args.seed, len(attempts), tuple(str(j.job_id) for j in attempts), tail)


EXECUTORS: dict[str, Executor] = {"local": run_local, "slurm": run_slurm}
