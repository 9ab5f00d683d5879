"""The NFS-safe lease lock: one holder at a time, kill -9 noticed at once, dead nodes after their lease,
a live holder kept by its heartbeat, and no double holding when many processes take over a stale lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from segment.data.locks import OWNER, LeaseLock, Owner, machine_id, process_start

ROOT = Path(__file__).parents[1]


def _python(code: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, text=True, **kw)


def _fake_holder(path: Path, *, machine: str, pid: int, start: str = "") -> None:
    path.mkdir(parents=True)
    (path / OWNER).write_text(json.dumps({"machine": machine, "pid": pid, "start": start, "token": "x", "beat": 0}))


def _dead_pid() -> int:
    proc = _python("pass")
    proc.wait()
    return proc.pid


def test_one_holder_at_a_time_and_release_removes_the_lock(tmp_path):
    path = tmp_path / "locks" / "entry.lock"
    a, b = LeaseLock(path), LeaseLock(path)
    assert a.acquire()
    assert not b.acquire(blocking=False)
    holder = b.holder()
    assert holder.machine == machine_id() and holder.token == a.owner.token
    a.release()
    assert not path.exists()
    assert b.acquire(blocking=False)
    b.release()


def test_a_holder_killed_on_this_machine_is_taken_over_at_once(tmp_path):
    path = tmp_path / "entry.lock"
    proc = _python(f"""
        from segment.data.locks import LeaseLock
        LeaseLock({str(path)!r}).acquire()
        print("held", flush=True)
        import time; time.sleep(60)
    """, stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    assert not LeaseLock(path).acquire(blocking=False)  # alive: not stale
    proc.kill()
    proc.wait()
    start = time.monotonic()
    lock = LeaseLock(path, lease_s=600, timeout_s=5)
    assert lock.acquire(blocking=False)  # what `cache gc` needs: no wait at all
    assert time.monotonic() - start < 1.0 and lock.holder().pid != proc.pid
    lock.release()


def test_a_reused_pid_is_not_taken_for_the_holder(tmp_path):
    """The holder's pid now belongs to another process (this one): its start time tells them apart."""
    if not process_start(os.getpid()):
        pytest.skip("no /proc here")
    path = tmp_path / "entry.lock"
    _fake_holder(path, machine=machine_id(), pid=os.getpid(), start="1")  # started at tick 1: not us
    lock = LeaseLock(path)
    assert lock.acquire(blocking=False)
    lock.release()


def test_a_holder_on_another_machine_is_taken_over_only_after_its_lease(tmp_path):
    path = tmp_path / "entry.lock"
    _fake_holder(path, machine="node-b/1", pid=_dead_pid())  # its pid means nothing here
    assert not LeaseLock(path, lease_s=0.5).acquire(blocking=False)
    with pytest.raises(TimeoutError, match=rf"lock {path}: held by pid \d+ on node-b/1 for more than 0.3 s"):
        LeaseLock(path, lease_s=0.6, timeout_s=0.3).acquire()
    start = time.monotonic()
    lock = LeaseLock(path, lease_s=0.6, timeout_s=5)
    assert lock.acquire()
    assert time.monotonic() - start >= 0.6 and lock.holder().machine == machine_id()
    lock.release()


def test_a_live_holder_keeps_its_lock_by_heartbeat(tmp_path):
    path = tmp_path / "entry.lock"
    holder = LeaseLock(path, lease_s=1.0)
    holder.acquire()
    with pytest.raises(TimeoutError):  # two leases without a takeover: the beats change owner.json
        LeaseLock(path, lease_s=1.0, timeout_s=2.0).acquire()
    assert LeaseLock(path).holder() == holder.owner and holder.owner.beat >= 2
    holder.release()
    assert not path.exists()


def test_processes_never_hold_together_even_while_taking_over_a_stale_lock(tmp_path):
    path, counter = tmp_path / "entry.lock", tmp_path / "counter"
    counter.write_text("0")
    _fake_holder(path, machine=machine_id(), pid=_dead_pid(), start="0")  # killed before the race starts
    workers = [_python(f"""
        import time
        from segment.data.locks import LeaseLock
        for _ in range(20):
            with LeaseLock({str(path)!r}, poll_s=0.001):
                n = int(open({str(counter)!r}).read())
                time.sleep(0.001)
                open({str(counter)!r}, "w").write(str(n + 1))
    """) for _ in range(4)]
    assert [w.wait(timeout=60) for w in workers] == [0] * 4
    assert counter.read_text() == "80"  # a lost update would show as fewer
    assert not path.exists() and not path.with_name(path.name + ".break").exists()


@pytest.mark.parametrize("kw, message", [
    ({"lease_s": 0}, r"LeaseLock lease_s = 0; it must be > 0 seconds"),
    ({"poll_s": -1.0}, r"LeaseLock poll_s = -1.0; it must be > 0 seconds"),
])
def test_bad_lock_settings_are_refused_before_anything_is_written(tmp_path, kw, message):
    with pytest.raises(ValueError, match=message):
        LeaseLock(tmp_path / "x" / "entry.lock", **kw)
    assert list(tmp_path.iterdir()) == []


def test_owner_of_this_process_is_alive_and_a_dead_one_is_not():
    assert not Owner.me().dead_here()
    assert Owner(machine_id(), _dead_pid(), "", "t").dead_here()
    assert not Owner("elsewhere/1", _dead_pid(), "", "t").dead_here()
