"""Cache folders that are whole or absent, record the SHA-256 of their files, and are checked on read.

Every cached folder of the project (a stage entry `ROOT/stages/STAGE/KEY`, a slice folder
`ROOT/slices/NAME`, a superpixel folder `ROOT/superpixels/NAME`) is written by `write_atomically`: its
files go into a temporary sibling `.tmp-NAME-*`, then a marker file (`stage.json` or `meta.json`) is
written last with the size, time and SHA-256 of every other file, and the folder is renamed into place
in one step. A reader checks a folder against its marker: `problem(hashes=False)` compares sizes and
times (a file whose time moved is hashed), `problem(hashes=True)` and `read_verified` compare hashes.
A bad folder is moved, with one warning naming it and the file, to `ROOT/quarantine/` and rebuilt by
its next writer. Each folder has one lock under `ROOT/locks/` (`segment.data.locks.LeaseLock`: an atomic mkdir
with an owner file, correct on NFS; a holder killed by kill -9 is taken over at once) that its writer
holds and removes on release, so locks do not pile up.

This module is the project's one file hasher and one atomic folder writer; it imports no torch, so the
pipelines' stage cache uses it too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from segment.data.locks import LeaseLock

log = logging.getLogger("supportforge.cache")

TMP_PREFIX = ".tmp-"  # temporary folders are `.tmp-NAME-XXXXXXXX` beside the folder NAME they become
QUARANTINE = "quarantine"
LOCKS = "locks"
T = TypeVar("T")


class Corrupt(Exception):
    """A cached folder does not match its record: the message names the file and what differs."""


def sha256_file(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes, read in 4 MiB chunks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def record_files(folder: Path, marker: str) -> dict[str, dict]:
    """`{relative path: {"sha256", "bytes", "mtime_ns"}}` of every file under `folder` but the marker."""
    out = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name != marker:
            stat = path.stat()
            out[name] = {"sha256": sha256_file(path), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    return out


def read_record(folder: Path, marker: str) -> dict:
    """The marker of `folder` as a dict with a `files` record; `Corrupt` when missing or unreadable."""
    path = folder / marker
    if not path.is_file():
        raise Corrupt(f"{marker} is missing (an incomplete folder)")
    try:
        record = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise Corrupt(f"{marker} is not valid JSON ({err})") from None
    if not isinstance(record, dict) or not isinstance(record.get("files"), dict):
        raise Corrupt(f"{marker} records no file hashes (written by an older version)")
    return record


def _check_file(path: Path, name: str, expected: dict, *, hashes: bool) -> None:
    """`Corrupt` when the file differs from `expected` in size, or (hashed when asked or its time moved) in bytes."""
    if not path.is_file():
        raise Corrupt(f"{name} is missing")
    stat = path.stat()
    if stat.st_size != expected["bytes"]:
        raise Corrupt(f"{name} has {stat.st_size} bytes, {expected['bytes']} recorded")
    if (hashes or stat.st_mtime_ns != expected["mtime_ns"]) and sha256_file(path) != expected["sha256"]:
        raise Corrupt(f"{name} does not match its recorded SHA-256")


def problem(folder: Path, marker: str, *, hashes: bool) -> str | None:
    """What is wrong with `folder`, or None when it is whole. Cheap (`hashes=False`): sizes and times,
    hashing only files whose time moved; full (`hashes=True`): every file's hash."""
    try:
        files = read_record(folder, marker)["files"]
        for name, expected in files.items():
            _check_file(folder / name, name, expected, hashes=hashes)
        extra = [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]
        extra = sorted(set(extra) - set(files) - {marker})
        if extra:
            raise Corrupt(f"{extra[0]} is not in the record")
    except Corrupt as err:
        return str(err)
    return None


def read_verified(folder: Path, name: str, record: dict) -> bytes:
    """The bytes of `folder/name`, checked against the folder's record (`read_record`): hash on use."""
    expected = record["files"].get(name)
    if expected is None:
        raise Corrupt(f"{name} is not in the record")
    try:
        data = (folder / name).read_bytes()
    except FileNotFoundError:
        raise Corrupt(f"{name} is missing") from None
    if len(data) != expected["bytes"]:
        raise Corrupt(f"{name} has {len(data)} bytes, {expected['bytes']} recorded")
    if hashlib.sha256(data).hexdigest() != expected["sha256"]:
        raise Corrupt(f"{name} does not match its recorded SHA-256")
    return data


def relative(root: Path, folder: Path) -> Path:
    """`folder`'s path under the cache root (either may be relative, or reached through a link)."""
    return Path(folder).resolve().relative_to(Path(root).resolve())


def lock_path(root: Path, folder: Path) -> Path:
    """The lock file of a cached folder: `ROOT/locks/<its path under ROOT, '/' as '~'>.lock`."""
    return Path(root) / LOCKS / ("~".join(relative(root, folder).parts) + ".lock")


@contextmanager
def lock(root: Path, folder: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock of `folder` (yields True), or with `blocking=False` yield False when another holds it."""
    with hold(lock_path(root, folder), blocking=blocking) as held:
        yield held


@contextmanager
def hold(path: Path, *, blocking: bool = True) -> Iterator[bool]:
    """Hold the lock `path` (yields True), or with `blocking=False` yield False when another holds it.

    A lock is a `LeaseLock` folder (an atomic mkdir with an owner file), which holds on NFS, where fcntl
    locks may not; a holder killed on this machine is taken over at once, one on a dead node after its
    lease. The holder removes the lock on release, so locks do not pile up.
    """
    if path.is_file():  # a lock file of the fcntl era: the kernel released it with its holder
        path.unlink(missing_ok=True)
    lease = LeaseLock(path)
    if not lease.acquire(blocking=blocking):
        yield False
        return
    try:
        yield True
    finally:
        lease.release()


def quarantine(root: Path, folder: Path, reason: str) -> Path:
    """Move a bad folder to `ROOT/quarantine/<its path>.*/` and warn once; the caller holds its lock."""
    rel = relative(root, folder)
    parent = Path(root) / QUARANTINE / rel.parent
    for attempt in range(3):  # `cache gc` may empty the quarantine between mkdtemp and rename
        parent.mkdir(parents=True, exist_ok=True)
        dest = Path(tempfile.mkdtemp(prefix=f"{rel.name}.", dir=parent)) / rel.name
        try:
            os.rename(folder, dest)
            break
        except FileNotFoundError:
            if attempt == 2 or not folder.exists():
                raise
    log.warning("cache: %s is bad: %s; moved to %s, rebuilding it", rel, reason, relative(root, dest))
    return dest


def discard(root: Path, folder: Path, marker: str) -> None:
    """Move `folder` aside if, checked again under its lock, it is still bad (another run may have
    replaced it in the meantime)."""
    with lock(root, folder):
        if folder.exists():
            bad = problem(folder, marker, hashes=True)
            if bad is not None:
                quarantine(root, folder, bad)


def load_verified(root: Path, folder: Path, names: list[str], load: Callable[[bytes], T], *,
                  marker: str = "meta.json") -> dict[str, T] | None:
    """`{name: load(bytes)}` of files of `folder`, each hash-checked; None when the folder is absent or
    bad (a bad one is moved aside, with a warning, so the caller rebuilds it)."""
    if not folder.exists():
        return None
    try:
        record = read_record(folder, marker)
        return {name: load(read_verified(folder, name, record)) for name in names}
    except Corrupt:
        discard(root, folder, marker)
        return None


def write_atomically(folder: Path, fill: Callable[[Path], None], meta: dict | Callable[[], dict], *,
                     root: Path, marker: str = "meta.json", replace: bool = False) -> bool:
    """Let `fill` write a temporary folder, add the marker (`meta` and the file record) last, then rename
    it to `folder` in one step, all under the folder's lock. Returns False when another run had already
    written a whole `folder` (same key, same content). A bad `folder` is moved aside first; with
    `replace`, a whole one is replaced. `meta` may be a function, called once `fill` is done."""
    root = Path(root)
    folder.parent.mkdir(parents=True, exist_ok=True)
    with lock(root, folder):
        if folder.exists() and not replace:
            bad = problem(folder, marker, hashes=True)
            if bad is None:
                return False
            quarantine(root, folder, bad)
        tmp = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{folder.name}-", dir=folder.parent))
        try:
            fill(tmp)
            info = meta() if callable(meta) else meta
            (tmp / marker).write_text(json.dumps({**info, "files": record_files(tmp, marker)}, indent=2, default=str))
            if folder.exists():  # replace: swap the old one out first, then drop it
                old = Path(tempfile.mkdtemp(prefix=f"{TMP_PREFIX}{folder.name}-", dir=folder.parent))
                os.rename(folder, old / folder.name)
                os.rename(tmp, folder)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return True


def temporary_target(tmp: Path) -> Path | None:
    """The folder a temporary `.tmp-NAME-XXXXXXXX` (or the older `.NAME.XXXXXXXX`) was to become."""
    name = tmp.name
    if name.startswith(TMP_PREFIX) and "-" in name[len(TMP_PREFIX):]:
        return tmp.parent / name[len(TMP_PREFIX):].rsplit("-", 1)[0]
    if name.startswith(".") and "." in name[1:]:
        return tmp.parent / name[1:].rsplit(".", 1)[0]
    return None
