"""Synthetic sets: deform the support masks, draw an image for each, and record exactly what went in.

A `SyntheticSet` is arrays plus a manifest: generator kind, checkpoint path and SHA-256 (of the weights and
of the `config.json` that holds the rest), seed, sampler and steps, the source support slice of every pair,
the support slices themselves, how many tiny fragments were dropped from each support mask before
deforming (`dropped_fragments`, aligned with `support`) and the generator's training provenance (every
volume and slice it learned from). `validate_manifest` checks a manifest against a fold's
query volumes and raises `LeakageError` if one appears. `save_grid` writes a PNG of pairs with the mask
outline drawn on the image, for a person to look at.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from augment.manifest import Provenance, SliceRef, validate_manifest  # noqa: F401 (re-exported)
from augment.masks import DeformConfig, classical_pairs, deform_masks
from augment.pairs import PairError, as_pairs
from augment.registry import generator
from augment.training import load_checkpoint


@dataclass(frozen=True)
class SyntheticSet:
    """`images`, `masks`: float32 `(N, 1, H, W)`; `manifest`: JSON-able provenance of every pair."""
    images: torch.Tensor
    masks: torch.Tensor
    manifest: dict

    def __len__(self) -> int:
        return self.images.shape[0]


def _support_refs(support_ids: Sequence[SliceRef], n: int) -> list[SliceRef]:
    refs = [r if isinstance(r, SliceRef) else SliceRef(str(r[0]), int(r[1])) for r in support_ids]
    if len(refs) != n:
        raise PairError(f"support_ids lists {len(refs)} slices but there are {n} support pairs")
    return refs


def _jsonable(manifest: dict) -> dict:
    """The manifest exactly as it will read back from manifest.json (tuples become lists)."""
    return json.loads(json.dumps(manifest))


def synthesize(checkpoint: Path, support_images, support_masks, support_ids: Sequence[SliceRef], *, n: int,
               seed: int, deform: DeformConfig = DeformConfig(), query_volumes: Sequence[str] = (),
               **sampling) -> SyntheticSet:
    """`n` synthetic pairs for one class: deform the support masks, then sample an image for each.

    `support_*` are the class's real support pairs `(S, 1, R, R)` and their (volume, slice) ids;
    `query_volumes` are the fold's queries, checked against everything the generator and this set used;
    `sampling` holds the generator's sampling keywords (`augment.registry`, e.g. `steps`, `sampler`), which
    default to those in its checkpoint.
    """
    # 1. check inputs and provenance before any work
    images, masks = as_pairs((support_images, support_masks), "support", resolution=None)
    refs = _support_refs(support_ids, images.shape[0])
    ckpt = load_checkpoint(checkpoint, kind=None, resolution=masks.shape[-1])
    training = Provenance.from_dict(ckpt["provenance"])
    manifest = {"generator": ckpt["kind"], "checkpoint": ckpt["path"], "checkpoint_sha256": ckpt["sha256"],
                "checkpoint_config_sha256": ckpt["config_sha256"],
                "seed": seed, "n": n, "fold": training.fold, "class_name": training.class_name,
                "support": [dataclasses.asdict(r) for r in refs], "training": training.to_dict(),
                "query_volumes": list(map(str, query_volumes)), "deform": dataclasses.asdict(deform)}
    validate_manifest(manifest, query_volumes)
    # 2. new masks from the real support masks  (n, 1, R, R)
    new_masks, source, dropped = deform_masks(masks, n, config=deform, seed=seed)
    # 3. an image for every mask
    source_gen = generator(ckpt["kind"])
    syn_images, syn_masks = source_gen.sample(ckpt, new_masks, seed=seed, **sampling)
    joint = bool(ckpt["config"].get("joint", False))
    used = {keyword: sampling.get(keyword) or ckpt["config"][field] for field, keyword in source_gen.sampling}
    manifest["sampler"] = used.get("sampler", "generator forward")
    manifest["steps"] = used.get("steps", 1)
    manifest["source"] = [None if joint else dataclasses.asdict(refs[s]) for s in source]
    manifest["dropped_fragments"] = dropped.tolist()
    return SyntheticSet(syn_images.float(), syn_masks.float(), _jsonable(manifest))


def classical_set(support_images, support_masks, support_ids: Sequence[SliceRef], *, n: int, seed: int,
                  deform: DeformConfig = DeformConfig(), fold: int = -1, class_name: str | None = None,
                  query_volumes: Sequence[str] = ()) -> SyntheticSet:
    """The control arm as a `SyntheticSet`: support image and mask deformed together (no generator)."""
    images, masks = as_pairs((support_images, support_masks), "support")
    refs = _support_refs(support_ids, images.shape[0])
    manifest = {"generator": "classical", "checkpoint": None, "checkpoint_sha256": None, "seed": seed, "n": n,
                "fold": fold, "class_name": class_name, "support": [dataclasses.asdict(r) for r in refs],
                "training": None, "query_volumes": list(map(str, query_volumes)),
                "deform": dataclasses.asdict(deform), "sampler": None, "steps": 0}
    validate_manifest(manifest, query_volumes)
    out_i, out_m, source, dropped = classical_pairs(images, masks, n, config=deform, seed=seed)
    manifest["source"] = [dataclasses.asdict(refs[s]) for s in source]
    manifest["dropped_fragments"] = dropped.tolist()
    return SyntheticSet(out_i, out_m, _jsonable(manifest))


def save_set(syn: SyntheticSet, out_dir: Path) -> Path:
    """Write `pairs.npz` and `manifest.json` into `out_dir` atomically (temporary folder, then rename)."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} already exists; synthetic sets are written once")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        np.savez_compressed(tmp / "pairs.npz", images=syn.images.numpy(), masks=syn.masks.numpy().astype(np.uint8))
        (tmp / "manifest.json").write_text(json.dumps(syn.manifest, indent=2))
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_set(path: Path) -> SyntheticSet:
    """Read a set written by `save_set`."""
    path = Path(path)
    if not (path / "pairs.npz").is_file() or not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is not a synthetic set (needs pairs.npz and manifest.json)")
    with np.load(path / "pairs.npz") as data:
        images, masks = torch.from_numpy(data["images"]), torch.from_numpy(data["masks"].astype(np.float32))
    return SyntheticSet(images, masks, json.loads((path / "manifest.json").read_text()))


def save_grid(rows: dict[str, tuple], path: Path, *, n: int = 8, title: str = "",
              flips: tuple[bool, bool] = (False, False)) -> Path:
    """PNG grid: one row per named `(images, masks)` (or `SyntheticSet`), mask outline drawn in red.
    `flips` (rows, columns) turns the slices for display only, e.g. to radiological orientation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), n, figsize=(1.6 * n, 1.7 * len(rows)), squeeze=False)
    for r, (name, pair) in enumerate(rows.items()):
        images, masks = (pair.images, pair.masks) if isinstance(pair, SyntheticSet) else pair
        for c in range(n):
            ax = axes[r, c]
            ax.axis("off")
            if c >= len(images):
                continue
            rows_, cols_ = (slice(None, None, -1 if f else 1) for f in flips)
            ax.imshow(np.asarray(images[c, 0], np.float32)[rows_, cols_], cmap="gray")
            ax.contour(np.asarray(masks[c, 0], np.float32)[rows_, cols_], levels=[0.5], colors="red", linewidths=0.7)
        axes[r, 0].set_title(name, fontsize=8, loc="left")
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return Path(path)
