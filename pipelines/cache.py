"""A content-addressed cache of stage artifacts, safe against kill -9 and concurrent runs.

An entry lives at `ROOT/stages/STAGE/KEY/`, where KEY hashes the stage name, the stage's code version,
the exact config subset it reads and the keys of its inputs. An entry is produced in a temporary folder
and renamed into place only once complete, with `stage.json` written last inside it; so a folder at the
final path is always whole, and a run killed at any moment leaves only a `.tmp-*` folder that nothing
trusts and `gc` removes. One lock file per entry (fcntl, released by the kernel when a process dies)
makes a second run wait for the first instead of writing the same entry twice.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

MARKER = "stage.json"


def stage_key(stage: str, version: str, config: dict, inputs: dict[str, str]) -> str:
    """Content hash of what decides a stage's output."""
    blob = json.dumps({"stage": stage, "version": version, "config": config, "inputs": inputs}, sort_keys=True,
                      default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class Entry:
    stage: str
    key: str
    path: Path
    ran: bool  # False when it came from the cache


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def done(self, stage: str, key: str) -> bool:
        return (self.folder(stage, key) / MARKER).is_file()

    @contextmanager
    def _lock(self, stage: str, key: str, *, blocking: bool = True) -> Iterator[bool]:
        locks = self.root / "locks"
        locks.mkdir(parents=True, exist_ok=True)
        with open(locks / f"{stage}-{key}.lock", "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
            except BlockingIOError:
                yield False
                return
            try:
                yield True
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def run(self, stage: str, key: str, produce: Callable[[Path], None], meta: dict | None = None) -> Entry:
        """Return the entry for (stage, key), producing it with `produce(tmp_folder)` when absent."""
        final = self.folder(stage, key)
        if self.done(stage, key):
            return Entry(stage, key, final, ran=False)
        with self._lock(stage, key):
            if self.done(stage, key):  # another run produced it while we waited
                return Entry(stage, key, final, ran=False)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
            try:
                start = time.time()
                produce(tmp)
                record = {"stage": stage, "key": key, "seconds": round(time.time() - start, 2),
                          "created": time.strftime("%Y-%m-%dT%H:%M:%S"), **(meta or {})}
                (tmp / MARKER).write_text(json.dumps(record, indent=2, default=str))
                os.rename(tmp, final)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
        return Entry(stage, key, final, ran=True)

    def remove(self, stage: str, key: str) -> None:
        """Drop one entry (for --force), waiting for any run that is writing it."""
        with self._lock(stage, key):
            shutil.rmtree(self.folder(stage, key), ignore_errors=True)

    def ls(self) -> list[dict]:
        """Every complete entry: stage, key, size in bytes and creation time."""
        rows = []
        for marker in sorted((self.root / "stages").glob(f"*/*/{MARKER}")):
            folder = marker.parent
            record = json.loads(marker.read_text())
            size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
            rows.append({"stage": folder.parent.name, "key": folder.name, "bytes": size,
                         "created": record.get("created", ""), "seconds": record.get("seconds")})
        return rows

    def gc(self, keep: set[tuple[str, str]] | None = None) -> list[Path]:
        """Remove leftovers of killed runs, and with `keep`, every entry not in it. Returns what went."""
        removed = []
        stages = self.root / "stages"
        for tmp in sorted(stages.glob("*/.tmp-*")) if stages.is_dir() else []:
            key = tmp.name.split("-")[1]
            with self._lock(tmp.parent.name, key, blocking=False) as free:
                if free:  # no live run is writing it
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
        if keep is not None:
            for row in self.ls():
                if (row["stage"], row["key"]) not in keep:
                    path = self.folder(row["stage"], row["key"])
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(path)
        return removed
