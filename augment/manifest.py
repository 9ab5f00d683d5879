"""Provenance of generator training data, and the leakage check of issue 4 item 4.

For fold f and class c a generator may learn from the images of fold f's training volumes and from the
support pairs that the protocol gives for fold f, never from a query volume of fold f. Every entry that went
into training is recorded as a `SliceRef` (volume id, slice index), so a manifest says exactly which volumes
and slices a synthetic set depends on, and `check_no_leakage` raises if a query volume appears.

A generator fine-tuned on another source's pairs (e.g. the learned transforms' warped supports) records,
for each fine-tuning row, where it came from (`finetune_source`), and under `derived` every further slice
those pairs were made from (the support slice warped, the appearance donor, the slices the transform model
learned from): the leakage check covers them as well.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field


class LeakageError(ValueError):
    """A query volume of the fold was used to train or condition a generator."""


@dataclass(frozen=True)
class SliceRef:
    """One training slice: `volume` id and axial `slice` index (the pair's row in the training arrays)."""
    volume: str
    slice: int


@dataclass(frozen=True)
class Provenance:
    """What a generator was trained on, pair by pair, and the volumes it must never see.

    `pretrain` and `finetune` are aligned with the rows of `pretrain_pairs` and `finetune_pairs`;
    `query_volumes` are the fold's query ids, checked at training time and again when a set is made.
    `finetune_source` names the source of each `finetune` row ("support", or a pair source such as
    "learned"; empty: all supports); `derived` lists the other slices the fine-tuning pairs were made from.
    """
    fold: int
    class_name: str | None = None
    setting: int | None = None
    pretrain: tuple[SliceRef, ...] = ()
    finetune: tuple[SliceRef, ...] = ()
    query_volumes: tuple[str, ...] = ()
    finetune_source: tuple[str, ...] = ()
    derived: tuple[SliceRef, ...] = ()
    notes: str = ""
    extra: dict = field(default_factory=dict)

    def volumes(self) -> set[str]:
        """Every volume id that contributed at least one slice."""
        return {r.volume for r in self.pretrain + self.finetune + self.derived}

    def to_dict(self) -> dict:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict) -> "Provenance":
        d = dict(d)
        for key in ("pretrain", "finetune", "derived"):
            d[key] = tuple(SliceRef(str(r["volume"]), int(r["slice"])) for r in d.get(key, ()))
        d["query_volumes"] = tuple(d.get("query_volumes", ()))
        d["finetune_source"] = tuple(d.get("finetune_source", ()))
        return Provenance(**d)


def refs(volume: str, slices) -> tuple[SliceRef, ...]:
    """Shorthand: `refs("3", [10, 11])` -> two `SliceRef`s of volume "3"."""
    return tuple(SliceRef(str(volume), int(s)) for s in slices)


def check_no_leakage(provenance: Provenance | dict, query_volumes=None) -> None:
    """Raise `LeakageError` if any training slice comes from a query volume.

    `query_volumes` defaults to the ones recorded in the provenance; pass a fold's `queries` to check a manifest
    against the protocol independently of what the manifest claims.
    """
    prov = Provenance.from_dict(provenance) if isinstance(provenance, dict) else provenance
    queries = set(map(str, prov.query_volumes if query_volumes is None else query_volumes))
    leaked = sorted(prov.volumes() & queries)
    if leaked:
        n = sum(r.volume in queries for r in prov.pretrain + prov.finetune + prov.derived)
        raise LeakageError(f"fold {prov.fold}: {n} training slices come from query volumes {leaked}; "
                           f"a generator may use only the fold's training volumes and its support pairs")


def merge(base: Provenance, newer: Provenance) -> Provenance:
    """Provenance of a model fine-tuned from `base`: its pretraining slices plus everything in `newer`."""
    if base.fold != newer.fold:
        raise LeakageError(f"init checkpoint was trained for fold {base.fold}, this run is for fold {newer.fold}")
    return Provenance(fold=newer.fold, class_name=newer.class_name, setting=newer.setting,
                      pretrain=base.pretrain + base.finetune + newer.pretrain, finetune=newer.finetune,
                      query_volumes=tuple(sorted(set(base.query_volumes) | set(newer.query_volumes))),
                      finetune_source=newer.finetune_source, derived=base.derived + newer.derived,
                      notes=newer.notes, extra=newer.extra)


def validate_manifest(manifest: dict, query_volumes: Sequence[str]) -> None:
    """Raise `LeakageError` if a query volume is among the training or support slices of a manifest."""
    training = Provenance.from_dict(manifest["training"]) if manifest.get("training") else Provenance(fold=-1)
    support = tuple(SliceRef(**r) for r in manifest["support"])
    check_no_leakage(dataclasses.replace(training, fold=manifest.get("fold", training.fold),
                                         finetune=training.finetune + support), query_volumes)
