"""The stage cache: content keys, atomic entries, leftovers of killed runs, locking."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
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
