"""A lock that holds on shared storage (NFS) where fcntl locks may not: an atomic mkdir plus an owner file.

Why: the stage cache is shared by the nodes of a cluster. fcntl locks over NFS depend on the lock daemon
and the mount options, and some mounts ignore them silently; two nodes would then build the same entry.

How:
1. Acquire = `os.mkdir(PATH)`, atomic on every NFS version and every local file system. The process that
   creates the folder holds the lock and writes `PATH/owner.json` (machine, pid, process start, token,
   beat) by write-then-rename, so a reader never sees half a file.
2. A holder's heartbeat thread rewrites owner.json every `lease_s / 4` with the next beat number.
3. A waiter takes a lock over when it is stale:
   a. the holder ran on this machine (host name and pid namespace) and its process is gone: kill -9 is
      noticed at once, as the kernel's release of an fcntl lock was;
   b. otherwise, when owner.json has not changed for `lease_s` by the waiter's own clock (a dead node).
      No clocks of two machines are ever compared, and content, unlike mtime, is not hidden by NFS
      attribute caching (open() revalidates).
4. Takeover is serialised by a second folder, `PATH.break`: under it the waiter re-reads owner.json and
   removes the lock only if it is still the one it judged stale. Two waiters that judged the same lock
   stale therefore cannot both remove it (the second would remove the first one's fresh lock).
Limits: a holder whose heartbeat stalls for a whole lease (a frozen node) loses its lock; choose the
lease well above any stall you expect (the default is 10 minutes). A waiter that finds a lock left by a
dead node waits one lease before taking it over.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

OWNER = "owner.json"


def machine_id() -> str:
    """This machine, as far as pids are concerned: host name and pid namespace (containers share hosts)."""
    try:
        namespace = os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        namespace = 0
    return f"{socket.gethostname()}/{namespace}"


def process_start(pid: int) -> str:
    """The start time of a process in clock ticks since boot, so that a reused pid is not taken for the
    holder; '' where /proc is absent."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]  # field 22 of proc(5); the command name may hold spaces


@dataclass(frozen=True)
class Owner:
    """Who holds a lock; `beat` counts the holder's heartbeats."""

    machine: str
    pid: int
    start: str
    token: str
    beat: int = 0

    @classmethod
    def me(cls) -> Owner:
        return cls(machine_id(), os.getpid(), process_start(os.getpid()), uuid.uuid4().hex)

    def dead_here(self) -> bool:
        """True only when the holder ran on this machine and its process is gone."""
        if self.machine != machine_id():
            return False
        if self.start and Path("/proc").is_dir():
            return process_start(self.pid) != self.start
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False


class _Observer:
    """How long a value has stayed the same, on this process's monotonic clock."""

    def __init__(self) -> None:
        self.value: object = None
        self.since = time.monotonic()

    def unchanged_for(self, value: object) -> float:
        if value != self.value:
            self.value, self.since = value, time.monotonic()
        return time.monotonic() - self.since


class LeaseLock:
    """An exclusive lock on `path` (a folder that must not exist otherwise), usable as a context manager.

    `lease_s`: how long a lock whose holder cannot be checked may stay unchanged before it is taken over.
    `timeout_s`: how long `acquire` waits before it raises TimeoutError (None: for ever).
    """

    def __init__(self, path: str | Path, *, lease_s: float = 600.0, poll_s: float = 0.1,
                 timeout_s: float | None = None) -> None:
        for name, value in (("lease_s", lease_s), ("poll_s", poll_s)):
            if not value > 0:
                raise ValueError(f"LeaseLock {name} = {value!r}; it must be > 0 seconds")
        self.path = Path(path)
        self.breaker = self.path.with_name(self.path.name + ".break")
        self.lease_s, self.poll_s, self.timeout_s = lease_s, poll_s, timeout_s
        self.owner: Owner | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def acquire(self, blocking: bool = True) -> bool:
        """Take the lock; without `blocking`, return False at once when a live holder has it."""
        start = time.monotonic()
        lock_seen, breaker_seen = _Observer(), _Observer()
        while True:
            if self._create():
                return True
            state = self._state()
            holder = _parse(state[1])
            stale = holder is not None and holder.dead_here()
            if blocking and not stale:
                stale = lock_seen.unchanged_for(state) >= self.lease_s
            if stale and self._break(state, breaker_seen if blocking else None):
                continue
            if not blocking:
                return False
            if self.timeout_s is not None and time.monotonic() - start > self.timeout_s:
                who = f"pid {holder.pid} on {holder.machine}" if holder else "an unknown holder"
                raise TimeoutError(f"lock {self.path}: held by {who} for more than {self.timeout_s} s")
            time.sleep(self.poll_s)

    def release(self) -> None:
        """Drop the lock if this object still holds it."""
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        holder = _parse(self._read(self.path / OWNER))
        if self.owner is not None and holder is not None and holder.token == self.owner.token:
            (self.path / OWNER).unlink(missing_ok=True)
            shutil.rmtree(self.path, ignore_errors=True)
        self.owner, self._heartbeat = None, None

    def holder(self) -> Owner | None:
        """The current holder, as its owner file says; None when free or not yet written."""
        return _parse(self._read(self.path / OWNER))

    def __enter__(self) -> LeaseLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _create(self) -> bool:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(self.path)
        except FileExistsError:
            return False
        self.owner = Owner.me()
        self._write(self.owner)
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name=f"lease {self.path.name}", daemon=True)
        self._heartbeat.start()
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.lease_s / 4):
            holder = _parse(self._read(self.path / OWNER))
            if self.owner is None or holder is None or holder.token != self.owner.token:
                return  # taken over (we stalled for a whole lease): nothing of ours to refresh
            self.owner = Owner(**{**asdict(self.owner), "beat": self.owner.beat + 1})
            self._write(self.owner)

    def _write(self, owner: Owner) -> None:
        tmp = self.path / f".{OWNER}.{owner.token}"
        tmp.write_text(json.dumps(asdict(owner)))
        os.replace(tmp, self.path / OWNER)

    def _state(self) -> tuple[int | None, str | None]:
        """The lock as a waiter sees it: the folder's inode (a new lock is a new folder) and owner.json."""
        try:
            inode = os.stat(self.path).st_ino
        except FileNotFoundError:
            return None, None
        return inode, self._read(self.path / OWNER)

    def _break(self, judged: tuple[int | None, str | None], breaker_seen: _Observer | None) -> bool:
        """Remove the lock if it is still the one judged stale; one waiter at a time (see the module doc)."""
        try:
            os.mkdir(self.breaker)
        except FileExistsError:  # another waiter is breaking it, or died doing so (then after a lease)
            if breaker_seen is not None and breaker_seen.unchanged_for(self.breaker.exists()) >= self.lease_s:
                shutil.rmtree(self.breaker, ignore_errors=True)
            return False
        try:
            if self._state() != judged:
                return False
            shutil.rmtree(self.path, ignore_errors=True)
            return True
        finally:
            os.rmdir(self.breaker)

    @staticmethod
    def _read(path: Path) -> str | None:
        try:
            return path.read_text()
        except (FileNotFoundError, NotADirectoryError):
            return None


def _parse(text: str | None) -> Owner | None:
    try:
        return Owner(**json.loads(text)) if text else None
    except (ValueError, TypeError):  # a file not written by this module: judged by its lease alone
        return None
