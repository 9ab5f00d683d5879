"""A content-addressed cache of stage artifacts, safe against kill -9, concurrent runs and damage.

An entry lives at `ROOT/stages/STAGE/KEY/`, where KEY hashes the stage name, the stage's code version,
the exact config subset it reads and the keys of its inputs. An entry is produced in a temporary folder
and renamed into place only once complete, with `stage.json` written last inside it, recording the size
and SHA-256 of every file (`segment.data.integrity.write_atomically`); a run killed at any moment leaves only
a `.tmp-*` folder that nothing trusts and `gc` removes. One lock per entry makes a second run wait for
the first instead of writing the same entry twice.

Reading checks: `done` (and `ls`) compares sizes and times with the record, `run` hashes every file of
an entry before returning it. A bad entry (edited, truncated, half deleted) is moved to
`ROOT/quarantine/` with one warning and produced again. Beside the stage entries the cache holds the
prepared slices (`ROOT/slices/`) and superpixel maps (`ROOT/superpixels/`), written the same way.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from segment.data.integrity import (LOCKS, QUARANTINE, hold, lock, problem, temporary_target,
                               write_atomically)

MARKER = "stage.json"
FOLDERS = {"slices": "meta.json", "superpixels": "meta.json"}  # folders beside the stages: marker of each


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(seconds))


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


@dataclass(frozen=True)
class Stored:
    """One folder of the cache: a stage entry (`stage`, `key`), or a slice or superpixel folder
    (`stage` is "slices" or "superpixels", `key` the folder name, `entry` False)."""

    stage: str
    key: str
    path: Path
    marker: str
    entry: bool

    @property
    def name(self) -> str:
        """Its path under the cache root: `stages/STAGE/KEY`, `slices/NAME` or `superpixels/NAME`."""
        return f"stages/{self.stage}/{self.key}" if self.entry else f"{self.stage}/{self.key}"


class StageCache:
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def folder(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    def done(self, stage: str, key: str) -> bool:
        """Whether a whole entry exists: the cheap check (sizes and times against its record)."""
        return problem(self.folder(stage, key), MARKER, hashes=False) is None

    def run(self, stage: str, key: str, produce: Callable[[Path], None], meta: dict | None = None) -> Entry:
        """Return the entry for (stage, key), hash-checked, producing it with `produce(tmp_folder)` when
        absent or bad (a bad one is moved to quarantine first, with a warning)."""
        final = self.folder(stage, key)
        if final.exists() and problem(final, MARKER, hashes=True) is None:
            return Entry(stage, key, final, ran=False)
        start = time.time()

        def record() -> dict:
            return {"stage": stage, "key": key, "seconds": round(time.time() - start, 2),
                    "created": _stamp(time.time()), **(meta or {})}

        ran = write_atomically(final, produce, record, root=self.root, marker=MARKER)
        return Entry(stage, key, final, ran=ran)  # ran is False when another run wrote it while we waited

    def remove(self, stage: str, key: str) -> None:
        """Drop one entry (for --force), waiting for any run that is writing it."""
        folder = self.folder(stage, key)
        with lock(self.root, folder):
            shutil.rmtree(folder, ignore_errors=True)

    def stored(self) -> list[Stored]:
        """Every stage entry, slice folder and superpixel folder at its final path, whole or not."""
        out = [Stored(p.parent.name, p.name, p, MARKER, True) for p in sorted((self.root / "stages").glob("*/*"))
               if p.is_dir() and not p.name.startswith(".")]
        for kind, marker in FOLDERS.items():
            out += [Stored(kind, p.name, p, marker, False) for p in sorted((self.root / kind).glob("*"))
                    if p.is_dir() and not p.name.startswith(".")]
        return out

    def ls(self) -> list[dict]:
        """Every stored folder: its name (path under the root), stage, key, whether a stage entry, size in
        bytes, creation time and `problem` (None when whole, by the cheap check of sizes and times)."""
        rows = []
        for s in self.stored():
            bad = problem(s.path, s.marker, hashes=False)
            record = {} if bad else json.loads((s.path / s.marker).read_text())
            created = "" if bad else record.get("created") or _stamp((s.path / s.marker).stat().st_mtime)
            rows.append({"name": s.name, "stage": s.stage, "key": s.key, "entry": s.entry, "created": created,
                         "bytes": sum(p.stat().st_size for p in s.path.rglob("*") if p.is_file()),
                         "seconds": record.get("seconds"), "problem": bad})
        return rows

    def verify(self) -> list[tuple[Stored, str | None]]:
        """Every stored folder with its `problem` by the full check: every file's SHA-256."""
        return [(s, problem(s.path, s.marker, hashes=True)) for s in self.stored()]

    def gc(self, keep: set[tuple[str, str]] | None = None, keep_folders: set[str] | None = None) -> list[Path]:
        """Remove what nothing trusts: leftovers of killed runs (`.tmp-*` folders nobody is writing),
        quarantined folders and unused lock files. With `keep`, also every stage entry not in it; with
        `keep_folders` (paths like `slices/NAME`), every slice and superpixel folder not in it.
        Returns what went."""
        removed = self._leftovers() + self._quarantined()
        if keep is not None:
            removed += self._drop([s for s in self.stored() if s.entry and (s.stage, s.key) not in keep])
        if keep_folders is not None:
            removed += self._drop([s for s in self.stored() if not s.entry and s.name not in keep_folders])
        return removed + self._unused_locks()

    def _leftovers(self) -> list[Path]:
        parents = [p for p in (self.root / "stages").glob("*") if p.is_dir()] + [self.root / k for k in FOLDERS]
        removed = []
        for tmp in sorted(t for parent in parents for t in parent.glob(".*") if t.is_dir()):
            target = temporary_target(tmp)
            if target is None:
                continue
            with lock(self.root, target, blocking=False) as free:
                if free:  # no live run is writing it
                    shutil.rmtree(tmp, ignore_errors=True)
                    removed.append(tmp)
        return removed

    def _quarantined(self) -> list[Path]:
        quarantine = self.root / QUARANTINE
        gone = [quarantine] if quarantine.is_dir() and any(quarantine.iterdir()) else []
        shutil.rmtree(quarantine, ignore_errors=True)
        return gone

    def _drop(self, unused: list[Stored]) -> list[Path]:
        removed = []
        for s in unused:
            with lock(self.root, s.path, blocking=False) as free:
                if free:  # a run writing or moving it aside holds its lock: leave it to that run
                    shutil.rmtree(s.path, ignore_errors=True)
                    removed.append(s.path)
        return removed

    def _unused_locks(self) -> list[Path]:
        """Lock files left by killed runs (a live holder deletes its own): those nobody holds now."""
        removed = []
        for path in sorted((self.root / LOCKS).glob("*.lock")):
            with hold(path, blocking=False) as free:  # held, it is deleted on release
                if free:
                    removed.append(path)
        return removed

