"""Executors: the Slurm path through submitit's local backend gives the local executor's rows bit for bit;
a killed job is resubmitted; a unit that always fails is reported by name with its log tail."""

from __future__ import annotations

import functools
import json
import os
import sys
from pathlib import Path

import cloudpickle
import pytest

from pipelines import executors
from pipelines.cli import main
from pipelines.config import ConfigError, RunConfig, SlurmConfig, load, parse
from pipelines.runner import UnitsFailed, run_experiment
from test_pipeline_run import TINY

# The jobs of these tests run in fresh processes that cannot import this module: ship its classes by value.
cloudpickle.register_pickle_by_value(sys.modules[__name__])

SLURM_LOCAL = """threads = 1
executor = "{executor}"
retries = 1
[run.slurm]
cluster = "local"
time_min = 5
"""


def _config(tmp: Path, data: Path, name: str, executor: str) -> Path:
    """TINY with two folds (two units), real-only and classical arms, one torch thread per unit."""
    text = TINY.format(data=data, out=tmp / name, cache=tmp / f"cache-{name}", n_pairs=2)
    text = text.replace("folds = [0]", "folds = [0, 1]").replace('[[arms]]\nname = "ddpm"\nsources = ["ddpm"]\n', "")
    path = tmp / f"{name}.toml"
    path.write_text(text + SLURM_LOCAL.format(executor=executor))
    return path


def _rows(run_dir: Path) -> list[dict]:
    return json.loads((run_dir / "results.json").read_text())["rows"]


class FlakyJob(executors.UnitJob):
    """The unit job, except for fold 1: killed on its first attempt (no result, no traceback), or broken
    on every attempt."""

    def __init__(self, *args, marker: Path, always: bool) -> None:
        super().__init__(*args)
        self.marker, self.always = marker, always

    def __call__(self) -> None:
        if self.args.fold.index == 1:
            if self.always:
                raise RuntimeError("fold 1 is broken on purpose")
            if not self.marker.exists():
                self.marker.write_text("first attempt killed")
                os._exit(9)
        super().__call__()


@pytest.fixture(scope="module")
def local_run(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("local")
    result = run_experiment(load(_config(tmp, phantom_dir, "local", "local")))
    assert result["failed_units"] == []
    return tmp / "local"


def test_slurm_path_retries_a_killed_job_and_gives_the_local_rows_bit_for_bit(local_run, phantom_dir, tmp_path,
                                                                              monkeypatch):
    marker = tmp_path / "killed-once"
    monkeypatch.setattr(executors, "UnitJob", functools.partial(FlakyJob, marker=marker, always=False))
    result = run_experiment(load(_config(tmp_path, phantom_dir, "slurm", "slurm")))
    assert marker.is_file()  # fold 1's first job was killed ...
    assert "unit fold1-seed0: job" in (tmp_path / "slurm" / "run.log").read_text()
    assert result["failed_units"] == []  # ... and its resubmission finished the run
    rows = _rows(tmp_path / "slurm")
    assert {r["fold"] for r in rows} == {0, 1}
    assert rows == _rows(local_run)  # every field, Dice as the exact float
    jobs = tmp_path / "slurm" / "jobs"
    assert len(list(jobs.glob("*_submitted.pkl"))) == 3  # two units, one of them twice
    records = json.loads((tmp_path / "slurm" / "stages.json").read_text())
    assert records["failed_units"] == [] and all(r["ran"] for r in records["records"] if r["stage"] == "segmenter")


def test_a_unit_that_always_fails_is_reported_by_name_and_the_others_keep_their_rows(local_run, phantom_dir,
                                                                                     tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(executors, "UnitJob", functools.partial(FlakyJob, marker=tmp_path / "m", always=True))
    assert main(["run", str(_config(tmp_path, phantom_dir, "broken", "slurm"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("supportforge: error: 1 unit(s) failed (fold 1 seed 0)")
    out = tmp_path / "broken"
    [failure] = json.loads((out / "stages.json").read_text())["failed_units"]
    assert (failure["fold"], failure["seed"], failure["attempts"]) == (1, 0, 2)  # the first try and one retry
    assert "fold 1 is broken on purpose" in failure["log_tail"]
    assert json.loads((out / "stages.json").read_text())["failed_units"] == [failure]
    assert json.loads((out / "results.json").read_text())["context"]["failed_units"] == [failure]
    assert "unit fold 1 seed 0 FAILED after 2 attempt(s)" in (out / "run.log").read_text()
    report = (out / "report.md").read_text()
    assert "## Failed units" in report and "- fold 1, seed 0: failed after 2 attempt(s)" in report
    rows = _rows(out)
    assert {r["fold"] for r in rows} == {0}  # no rows, no average over the gap
    assert rows == [r for r in _rows(local_run) if r["fold"] == 0]


def test_every_unit_failing_raises_and_lists_them(phantom_dir, tmp_path, monkeypatch, capsys):
    class Broken(executors.UnitJob):
        def __call__(self) -> None:
            raise RuntimeError(f"{self.args.name} broken")

    monkeypatch.setattr(executors, "UnitJob", Broken)
    cfg = _config(tmp_path, phantom_dir, "none", "slurm")
    cfg.write_text(cfg.read_text().replace("retries = 1", "retries = 0"))
    with pytest.raises(UnitsFailed, match=r"every unit failed: \[\(0, 0\), \(1, 0\)\]"):
        run_experiment(load(cfg))
    failed = json.loads((tmp_path / "none" / "stages.json").read_text())["failed_units"]
    assert [(f["fold"], f["attempts"]) for f in failed] == [(0, 1), (1, 1)]
    assert "fold0-seed0 broken" in failed[0]["log_tail"] and not (tmp_path / "none" / "results.json").exists()
    assert main(["run", str(cfg)]) == 1  # the CLI: one line, no traceback
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("supportforge: error: every unit failed")


def test_slurm_resources_come_from_run_slurm(tmp_path, monkeypatch):
    """A stand-in sbatch captures the batch script submitit writes: the resources of [run.slurm] are in it."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text(f'#!/bin/sh\nfor last; do :; done\ncp "$last" {bin_dir}/script.sh\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    run = RunConfig(executor="slurm", slurm=SlurmConfig(partition="gpu", time_min=90, cpus_per_task=4,
                                                         gpus_per_node=1, mem_gb=16))
    executors.check_backend(run)  # sbatch and srun are there now
    job = executors.submitit_executor(run, tmp_path / "jobs", "supportforge-t").submit(print, "unit")
    script = (bin_dir / "script.sh").read_text()
    assert job.job_id == "4242"
    for line in ("--partition=gpu", "--time=90", "--cpus-per-task=4", "--gpus-per-node=1", "--mem=16GB",
                 "--job-name=supportforge-t"):
        assert f"#SBATCH {line}\n" in script, line


def test_run_slurm_parses_into_a_frozen_config():
    cfg = parse({"data": {"path": "x"}, "run": {"executor": "slurm", "retries": 3, "slurm": {
        "partition": "gpu", "time_min": 60, "cpus_per_task": 2, "gpus_per_node": 1, "mem_gb": 12}}})
    assert cfg.run.executor == "slurm" and cfg.run.retries == 3
    assert cfg.run.slurm == SlurmConfig(partition="gpu", time_min=60, cpus_per_task=2, gpus_per_node=1, mem_gb=12.0)
    assert parse({"data": {"path": "x"}}).run.slurm == SlurmConfig()
    with pytest.raises(AttributeError):
        cfg.run.slurm.partition = "cpu"


@pytest.mark.parametrize("run, message", [
    ({"executor": "pbs"}, r"\[run\] executor = 'pbs'; valid values are \['local', 'slurm'\]"),
    ({"retries": -1}, r"\[run\] retries = -1; it must be >= 0"),
    ({"slurm": {"cluster": "sge"}}, r"\[run.slurm\] cluster = 'sge'; valid values are \['slurm', 'local', 'debug'\]"),
    ({"slurm": {"partiton": "gpu"}}, r"\[run.slurm\] unknown key\(s\) \['partiton'\]; valid keys are .*'partition'"),
    ({"slurm": {"mem_gb": 0}}, r"\[run.slurm\] mem_gb = 0.0; it must be >= 1"),
    ({"slurm": {"time_min": "1h"}}, r"\[run.slurm\] time_min = '1h'; expected int"),
    ({"slurm": "big"}, r"\[run.slurm\] must be a table, got 'big'"),
])
def test_bad_run_values_name_the_key(run, message):
    with pytest.raises(ConfigError, match=message):
        parse({"data": {"path": "x"}, "run": run})


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.replace('executor = "slurm"', 'executor = "pbs"'), r"\[run\] executor = 'pbs'; valid values"),
    (lambda t: t.replace('cluster = "local"', 'cluster = "slurm"'), r"sbatch/srun are not on PATH"),
])
def test_bad_executor_exits_2_with_one_line_and_writes_nothing(phantom_dir, tmp_path, capsys, monkeypatch,
                                                               edit, message):
    monkeypatch.setenv("PATH", os.path.dirname(sys.executable))  # no Slurm here, whatever the machine has
    cfg = _config(tmp_path, phantom_dir, "bad", "slurm")
    cfg.write_text(edit(cfg.read_text()))
    before = sorted(p.name for p in tmp_path.iterdir())
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("supportforge: error:")
    import re
    assert re.search(message, err[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # no run folder, no cache
