"""The oracle source, for diagnosis only: real slices of the fold's training volumes with their TRUE labels.

Setting 1 forbids it (it reads the test class's labels of the training volumes), so `augment.registry`
marks it `reads_labels` and the experiment config allows it only in a diagnostic arm of a diagnostic run.
It is the ceiling the honest sources are measured against: the same number of pairs, at the supports'
relative positions (EP1) in each volume's class span (`augment.warped_pairs.oracle_pairs`).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from augment.manifest import Provenance, SliceRef, validate_manifest
from augment.pairs import PairError
from augment.synthesis import SyntheticSet, _jsonable, _support_refs
from augment.warped_pairs import EP1_POSITIONS, oracle_pairs


def make_set(checkpoint: Path | None, *, support: tuple[torch.Tensor, torch.Tensor, Sequence[SliceRef]],
             support_volume: np.ndarray, support_slices: Sequence[int], volumes: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray] | None, n: int, seed: int, fold: int, class_name: str,
             query_volumes: Sequence[str]) -> SyntheticSet:
    """DIAGNOSTIC ONLY: `n` training slices `(n, 1, R, R)` with their true masks of the class (`labels` {id:
    `(Z, H, W)` bool}); the support is recorded but not used."""
    if labels is None or set(labels) != set(volumes):
        raise PairError(f"oracle pairs, fold {fold}, class {class_name}: needs the class's labels of every "
                        f"training volume {sorted(volumes)}")
    ids = list(volumes)
    refs_ = _support_refs(support[2], len(support[0]))
    images, masks, info = oracle_pairs([volumes[v] for v in ids], [labels[v] for v in ids], n,
                                       relative_positions=EP1_POSITIONS, seed=seed)
    used = [SliceRef(ids[p["volume"]], p["slice"]) for p in info["pairs"]]
    provenance = Provenance(fold=fold, class_name=class_name, pretrain=tuple(used),
                            query_volumes=tuple(map(str, query_volumes)),
                            notes="ORACLE: true test-class labels of training volumes (diagnostic only)")
    manifest = {"generator": "oracle", "checkpoint": None, "checkpoint_sha256": None, "seed": seed, "n": n,
                "fold": fold, "class_name": class_name, "support": [dataclasses.asdict(r) for r in refs_],
                "training": provenance.to_dict(), "query_volumes": list(map(str, query_volumes)), "deform": None,
                "sampler": None, "steps": 0, "diagnostic": True, "positions": list(EP1_POSITIONS),
                "source": [dataclasses.asdict(r) for r in used], "dropped_fragments": [0] * len(refs_),
                "skipped": [{"volume": ids[s["volume"]], "why": s["why"]} for s in info["skipped"]]}
    validate_manifest(manifest, query_volumes)
    return SyntheticSet(images.float(), masks.float(), _jsonable(manifest))
