"""The stage cache: content keys, atomic entries, leftovers of killed runs, locking, file records."""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from pipelines.cache import StageCache, stage_key


def test_key_changes_with_config_version_and_inputs():
    base = stage_key("train", "1", {"steps": 10}, {"data": "abc"})
    assert base == stage_key("train", "1", {"steps": 10}, {"data": "abc"})
    assert base != stage_key("train", "2", {"steps": 10}, {"data": "abc"})
    assert base != stage_key("train", "1", {"steps": 11}, {"data": "abc"})
    assert base != stage_key("train", "1", {"steps": 10}, {"data": "abd"})


def test_run_produces_once_then_reads(tmp_path):
    cache = StageCache(tmp_path)
    calls = []

    def produce(folder: Path) -> None:
        calls.append(folder)
        (folder / "out.txt").write_text("hello")

    first = cache.run("s", "k1", produce)
    second = cache.run("s", "k1", produce)
    assert first.ran and not second.ran and len(calls) == 1
    assert (second.path / "out.txt").read_text() == "hello"
    assert [r["key"] for r in cache.ls()] == ["k1"]


def test_failed_stage_leaves_nothing(tmp_path):
    cache = StageCache(tmp_path)

    def boom(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        raise RuntimeError("stage failed")

    with pytest.raises(RuntimeError):
        cache.run("s", "k", boom)
    assert not cache.done("s", "k")
    assert not [p for p in (tmp_path / "stages" / "s").iterdir()]


def _slow_stage(root: str) -> None:
    def produce(folder: Path) -> None:
        (folder / "half.txt").write_text("half")
        time.sleep(60)
    StageCache(root).run("s", "k", produce)


def test_killed_run_leaves_no_trusted_entry_and_gc_cleans_it(tmp_path):
    proc = mp.get_context("spawn").Process(target=_slow_stage, args=(str(tmp_path),))
    proc.start()
    deadline = time.time() + 30
    while not list((tmp_path / "stages" / "s").glob(".tmp-*/half.txt")) if (tmp_path / "stages" / "s").exists() else True:
        assert time.time() < deadline, "the stage never started"
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    cache = StageCache(tmp_path)
    assert not cache.done("s", "k") and cache.ls() == []
    removed = cache.gc()
    assert len(removed) == 1 and not list((tmp_path / "stages" / "s").glob(".tmp-*"))
    assert cache.run("s", "k", lambda f: (f / "x").write_text("ok")).ran


def _writer(root: str, tag: str, log: str) -> None:
    def produce(folder: Path) -> None:
        with open(log, "a") as f:
            f.write(f"{tag}\n")
        time.sleep(0.5)
        (folder / "who.txt").write_text(tag)
    StageCache(root).run("s", "shared", produce)


def test_two_runs_on_one_cache_produce_an_entry_once(tmp_path):
    log = tmp_path / "log.txt"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(tmp_path / "c"), t, str(log))) for t in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
    assert all(p.exitcode == 0 for p in procs)
    assert len(log.read_text().split()) == 1  # the second waited on the lock, then found the entry
    assert StageCache(tmp_path / "c").done("s", "shared")


def test_gc_keeps_only_what_is_asked(tmp_path):
    cache = StageCache(tmp_path)
    for k in ("a", "b"):
        cache.run("s", k, lambda f: (f / "x").write_text("x"))
    removed = cache.gc(keep={("s", "a")})
    assert [p.name for p in removed] == ["b"] and [r["key"] for r in cache.ls()] == ["a"]


def test_an_entry_records_size_time_and_hash_of_every_file_and_leaves_no_lock(tmp_path):
    cache = StageCache(tmp_path)
    entry = cache.run("s", "k", lambda f: ((f / "sub").mkdir(), (f / "sub" / "x.bin").write_bytes(b"abc")))
    files = json.loads((entry.path / "stage.json").read_text())["files"]
    assert files == {"sub/x.bin": {"sha256": hashlib.sha256(b"abc").hexdigest(), "bytes": 3,
                                   "mtime_ns": (entry.path / "sub" / "x.bin").stat().st_mtime_ns}}
    assert not list((tmp_path / "locks").iterdir())  # the writer deleted its lock file


def test_a_changed_file_is_caught_on_use_moved_aside_once_and_produced_again(tmp_path, caplog):
    cache = StageCache(tmp_path)
    produce = lambda f: (f / "rows.json").write_text('{"dice": 0.5}')  # noqa: E731
    path = cache.run("s", "k", produce).path
    stat = (path / "rows.json").stat()
    (path / "rows.json").write_text('{"dice": 0.9}')  # same size; the time put back
    os.utime(path / "rows.json", ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert cache.done("s", "k")  # the cheap check sees sizes and times only
    again = cache.run("s", "k", produce)
    assert again.ran and (again.path / "rows.json").read_text() == '{"dice": 0.5}'
    assert not cache.run("s", "k", produce).ran
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "stages/s/k" in warnings[0] and "rows.json does not match" in warnings[0]
    moved = list((tmp_path / "quarantine" / "stages" / "s").glob("k.*/k/rows.json"))
    assert [m.read_text() for m in moved] == ['{"dice": 0.9}']


@pytest.mark.parametrize("damage, problem", [
    (lambda p: (p / "x").write_text("longer"), "x has 6 bytes, 1 recorded"),
    (lambda p: (p / "x").unlink(), "x is missing"),
    (lambda p: (p / "extra").write_text("?"), "extra is not in the record"),
    (lambda p: (p / "stage.json").write_text("{"), "stage.json is not valid JSON"),
    (lambda p: (p / "stage.json").write_text('{"stage": "s"}'), "records no file hashes"),
])
def test_the_cheap_check_sees_sizes_missing_and_extra_files_and_a_bad_record(tmp_path, damage, problem):
    cache = StageCache(tmp_path)
    path = cache.run("s", "k", lambda f: (f / "x").write_text("x")).path
    damage(path)
    assert not cache.done("s", "k") and problem in cache.ls()[0]["problem"]
    assert cache.run("s", "k", lambda f: (f / "x").write_text("x")).ran and cache.done("s", "k")


def _killed_holder(path: Path) -> None:
    """A lock left by a holder killed on this machine: its owner file names a process that is gone."""
    from segment.data.locks import OWNER, Owner, machine_id
    path.mkdir(parents=True)
    (path / OWNER).write_text(json.dumps(asdict(Owner(machine_id(), os.getpid(), "not-this-process", "t"))))


def _hold(root: str, folder: str, ready, release) -> None:
    from segment.data.integrity import lock
    with lock(Path(root), Path(folder)):
        ready.set()
        release.wait(30)


def test_gc_removes_lock_files_nobody_holds_and_keeps_held_ones(tmp_path):
    from segment.data.integrity import lock_path
    cache = StageCache(tmp_path)
    stale = lock_path(tmp_path, tmp_path / "stages" / "s" / "dead")
    _killed_holder(stale)
    ctx = mp.get_context("spawn")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(str(tmp_path), str(tmp_path / "stages" / "s" / "live"), ready, release))
    holder.start()
    try:
        assert ready.wait(30)
        held = lock_path(tmp_path, tmp_path / "stages" / "s" / "live")
        assert cache.gc() == [stale] and held.is_dir() and not stale.exists()
    finally:
        release.set()
        holder.join()
    assert not held.exists()  # its holder deleted it on release


def test_an_entry_is_written_under_a_lease_lock_that_names_its_holder(tmp_path):
    """The lock is an atomic-mkdir folder with an owner file (correct on NFS), not an fcntl lock."""
    from segment.data.integrity import lock_path
    from segment.data.locks import OWNER
    cache = StageCache(tmp_path)
    seen = {}

    def produce(folder: Path) -> None:
        held = lock_path(tmp_path, cache.folder("s", "k"))
        seen["owner"] = json.loads((held / OWNER).read_text())
        (folder / "x").write_text("x")

    cache.run("s", "k", produce)
    assert seen["owner"]["pid"] == os.getpid()
    assert not lock_path(tmp_path, cache.folder("s", "k")).exists()  # removed on release
