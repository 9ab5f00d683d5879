"""What every stage is: a frozen dataclass of exactly the inputs it reads, whose cache key is derived from
those fields, and the runner that runs one through the stage cache.

A stage's key hashes its name, its code version and the identity of every field: a config dataclass by
its fields, an input stage by its entry's key, the prepared data by its content key. A field can only be
left out of the key by declaring it `context()` (where to keep side caches: it never changes an output).
So an input a stage reads cannot be missing from its key, and `tests/test_pipeline_stages.py` checks,
over `dataclasses.fields` of every stage class, that changing any field changes the key.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from pipelines.cache import StageCache
from segment.data.slices import PreparedData

KEYED = "keyed"  # field metadata: False for a context field, left out of the key


def context() -> Any:
    """A field that never changes what a stage writes (where side caches live, a label for the log): it
    stays out of the key."""
    return field(metadata={KEYED: False}, compare=False)


@dataclass(frozen=True)
class StageEntry:
    """A finished stage run: its folder in the cache and its key."""

    path: Path
    key: str


def identity(value: Any, where: str = "field") -> Any:
    """The JSON-able identity of a field's value for the key; a type without one raises instead of being
    skipped, so nothing a stage reads can fall out of its key unnoticed."""
    if isinstance(value, StageEntry | PreparedData):
        return {"key": value.key}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: identity(getattr(value, f.name), f"{where}.{f.name}") for f in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(k): identity(v, f"{where}[{k}]") for k, v in sorted(value.items())}
    if isinstance(value, list | tuple):
        return [identity(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, bool | int | float | str):
        return value
    raise TypeError(f"{where} = {value!r}: a {type(value).__name__} has no identity for a stage key")


@dataclass(frozen=True, kw_only=True)
class Stage:
    """Base of the stages: subclasses set `name` and `version`, declare their inputs as fields and
    implement `label` and `produce(folder)`. Bump `version` when the code changes what a stage writes."""

    name: ClassVar[str]
    version: ClassVar[str]

    def fields(self) -> dict[str, Any]:
        """Identity of every keyed field."""
        return {f.name: identity(getattr(self, f.name), f"{self.name}.{f.name}") for f in dataclasses.fields(self)
                if f.metadata.get(KEYED, True)}

    def key(self) -> str:
        """Content hash of the stage name, its version and its fields."""
        blob = json.dumps({"stage": self.name, "version": self.version, "fields": self.fields()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]

    @property
    def label(self) -> str:
        raise NotImplementedError

    def produce(self, folder: Path) -> None:
        raise NotImplementedError


def stage_classes() -> dict[str, type[Stage]]:
    """Every concrete stage class by name (those imported so far)."""
    out, todo = {}, list(Stage.__subclasses__())
    while todo:
        cls = todo.pop(0)
        todo += cls.__subclasses__()
        if "name" in cls.__dict__:
            out[cls.name] = cls
    return out


class NotCached(Exception):
    """A stage entry is missing while the runner was asked to use cached entries only."""


def _not_cached(stage: str):
    def produce(folder: Path) -> None:
        raise NotCached(stage)
    return produce


def log_record(log: logging.Logger, r: dict) -> None:
    log.info("%-18s %-44s %s %s", r["stage"], r["label"], "ran" if r["ran"] else "cached", f"({r['seconds']} s, {r['key']})")


@dataclass
class StageRunner:
    """Runs one stage through the cache, logs whether it ran or was cached, and keeps a record.

    With `cached_only`, a missing (or bad) entry raises `NotCached` instead of running, and nothing is
    logged: the runner uses it to find, in-process and cheaply, the units that need no work at all.
    Each record carries the pid of the process that ran it (a pool worker's with `jobs` > 1).
    """

    cache: StageCache
    force: frozenset[str]
    log: logging.Logger
    records: list[dict] = field(default_factory=list)
    cached_only: bool = False

    def __call__(self, stage: Stage) -> StageEntry:
        key = stage.key()
        if self.cached_only and not self.cache.done(stage.name, key):
            raise NotCached(stage.name)
        if stage.name in self.force and self.cache.done(stage.name, key):
            self.cache.remove(stage.name, key)
        start = time.perf_counter()
        produce = _not_cached(stage.name) if self.cached_only else stage.produce  # a bad entry found by the
        entry = self.cache.run(stage.name, key, produce,  # hash check is moved aside, then built by a unit
                               meta={"label": stage.label, "fields": stage.fields()})
        record = {"stage": stage.name, "label": stage.label, "key": key, "ran": entry.ran,
                  "seconds": round(time.perf_counter() - start, 2), "pid": os.getpid()}
        if not self.cached_only:
            log_record(self.log, record)
        self.records.append(record)
        return StageEntry(entry.path, key)
