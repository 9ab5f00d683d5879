"""A damaged cache is detected, moved aside once and rebuilt; `cache verify`; pool workers die with their run.

One tiny experiment fills a cache once; each test damages its own copy (copied with file times kept), runs
again and checks that the results are the true ones, that one warning named the entry and the file, and
that the bad folder went to `quarantine/`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pipeline_run import TINY, _rows, _stages

from pipelines.cli import main

SMALL = TINY.replace('[[arms]]\nname = "ddpm"\nsources = ["ddpm"]\n', "")  # no generator: faster


def _write_config(tmp: Path, data: Path, cache: Path, *, text: str = SMALL, name: str = "run") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(text.format(data=data, out=tmp / name, cache=cache, n_pairs=2))
    return path


@pytest.fixture(scope="module")
def reference(phantom_dir, tmp_path_factory):
    """A whole cache and the rows of the run that filled it."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["run", str(_write_config(tmp, phantom_dir, tmp / "cache"))]) == 0
    assert _stages(tmp / "run")["prepare"] == [True]  # prepared by this run
    return tmp / "cache", _rows(tmp / "run")


@pytest.fixture()
def copy(reference, phantom_dir, tmp_path):
    """A private copy of the reference cache (file times kept) and a config that uses it."""
    cache = Path(shutil.copytree(reference[0], tmp_path / "cache"))
    return cache, _write_config(tmp_path, phantom_dir, cache), tmp_path / "run"


def _entry(cache: Path, stage: str, label_part: str) -> Path:
    found = [m.parent for m in (cache / "stages" / stage).glob("*/stage.json")
             if label_part in json.loads(m.read_text())["label"]]
    assert len(found) == 1, (stage, label_part, found)
    return found[0]


def _warnings(caplog, *words: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and all(w in r.getMessage() for w in words)]


def _same_size_edit(path: Path, old: bytes, new: bytes) -> None:
    """Replace bytes without changing the size or the file's time: only a hash can tell."""
    stat = path.stat()
    data = path.read_bytes()
    assert old in data and len(old) == len(new)
    path.write_bytes(data.replace(old, new, 1))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def test_edited_dice_in_a_cached_rows_json_is_not_reported(copy, reference, caplog):
    cache, cfg, out = copy
    entry = _entry(cache, "evaluate", "classical")
    rows = entry / "rows.json"
    _same_size_edit(rows, b'"dice": 0.', b'"dice": 9.')  # a Dice of 9.x, same bytes count, same time
    assert main(["run", str(cfg), "--force", "report"]) == 0  # the report is computed again from the rows
    assert _rows(out) == reference[1]  # the true values, not the edited one
    assert len(_warnings(caplog, f"evaluate/{entry.name}", "rows.json", "SHA-256")) == 1
    assert list((cache / "quarantine" / "stages" / "evaluate").glob(f"{entry.name}.*/{entry.name}/rows.json"))
    assert _stages(out)["evaluate"].count(True) == 1  # that entry alone was evaluated again


def test_truncated_segmenter_model_is_rebuilt_not_a_traceback(copy, reference, caplog):
    cache, cfg, out = copy
    entry = _entry(cache, "segmenter", "fold0")
    _truncate(entry / "model.pt")
    assert main(["run", str(cfg), "--force", "finetune"]) == 0  # fine-tuning loads the base model
    assert _stages(out)["segmenter"] == [True]
    assert _rows(out) == reference[1]
    assert len(_warnings(caplog, f"segmenter/{entry.name}", "model.pt")) == 1
    assert main(["cache", "verify", "--cache", str(cache)]) == 0  # whole again


@pytest.mark.parametrize("force", [[], ["--force", "prepare"]])
def test_truncated_slices_are_detected_and_prepared_again(copy, reference, caplog, force):
    cache, cfg, out = copy
    folder = next((cache / "slices").iterdir())
    _truncate(folder / "volume_1.npz")
    assert main(["run", str(cfg), *force]) == 0
    assert _stages(out)["prepare"] == [True]
    assert _rows(out) == reference[1]
    assert len(_warnings(caplog, f"slices/{folder.name}", "volume_1.npz")) == 1
    assert main(["run", str(cfg)]) == 0
    assert _stages(out)["prepare"] == [False]  # read from the cache this time


def test_force_prepare_prepares_a_whole_cache_again(copy):
    cache, cfg, out = copy
    meta = next((cache / "slices").iterdir()) / "meta.json"
    stamp = meta.stat().st_mtime_ns
    assert main(["run", str(cfg), "--force", "prepare"]) == 0
    assert _stages(out)["prepare"] == [True] and meta.stat().st_mtime_ns != stamp


def test_deleted_stage_json_moves_the_folder_aside_and_rebuilds(copy, reference, caplog):
    cache, cfg, out = copy
    entry = _entry(cache, "segmenter", "fold0")
    (entry / "stage.json").unlink()
    assert main(["run", str(cfg)]) == 0  # not `OSError: Directory not empty`
    assert _stages(out)["segmenter"] == [True] and (entry / "stage.json").is_file()
    assert _rows(out) == reference[1]
    assert len(_warnings(caplog, f"segmenter/{entry.name}", "stage.json is missing")) == 1
    assert list((cache / "quarantine" / "stages" / "segmenter").glob(f"{entry.name}.*/{entry.name}/model.pt"))


def _tree(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_cache_verify_and_ls_name_bad_entries_and_write_nothing(copy, capsys):
    cache, _, _ = copy
    assert main(["cache", "verify", "--cache", str(cache)]) == 0
    assert " 0 bad" in capsys.readouterr().out
    superpixels = next((cache / "superpixels").iterdir())
    npz = next(superpixels.glob("*.npz"))
    data = npz.read_bytes()
    stat = npz.stat()
    npz.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit, same size and time
    os.utime(npz, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    segmenter = _entry(cache, "segmenter", "fold0")
    _truncate(segmenter / "model.pt")
    before = _tree(cache)
    assert main(["cache", "ls", "--cache", str(cache)]) == 0
    listing = capsys.readouterr().out
    assert f"{segmenter.name}" in listing and "BAD: model.pt has" in listing
    with pytest.raises(SystemExit) as exit_:
        main(["cache", "verify", "--cache", str(cache)])
    assert exit_.value.code == 1
    out = capsys.readouterr().out
    assert f"BAD superpixels/{superpixels.name}: {npz.name} does not match its recorded SHA-256" in out
    assert f"BAD stages/segmenter/{segmenter.name}: model.pt has" in out and " 2 bad" in out
    assert _tree(cache) == before  # ls and verify only read


def _children(pid: int) -> set[int]:
    """Living (not zombie) processes whose parent is `pid`, from /proc."""
    out = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z":
            out.add(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").is_file(), reason="needs /proc")
def test_kill_9_of_a_jobs_run_leaves_no_worker_running(phantom_dir, tmp_path):
    text = SMALL.replace("folds = [0]", "folds = [0, 1]").replace("steps = 6", "steps = 2000")
    cfg = _write_config(tmp_path, phantom_dir, tmp_path / "cache", text=text)
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "run", str(cfg), "--jobs", "2"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=Path(__file__).parents[1])
    workers: set[int] = set()
    try:
        deadline = time.time() + 240
        # two stage entries in the making at once: both workers are at work on their unit (the parent
        # writes only the superpixel entry, before it starts the pool)
        while len(list((tmp_path / "cache" / "stages").glob("*/.tmp-*"))) < 2:
            assert proc.poll() is None and time.time() < deadline, "the workers never started their units"
            time.sleep(0.1)
        workers = _children(proc.pid)
        assert len(workers) >= 2
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(_alive(p) for p in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [p for p in workers if _alive(p)], "workers outlived the run that started them"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in workers:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
