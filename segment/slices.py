"""Volumes as normalised 2D axial slices at a working resolution, cached on disk.

The cache folder is named by a content hash of everything that decides its contents: the slice code
version, the dataset spec, the resolution and the bytes of every image and label file. Changing any of
them gives a new folder, so stale slices cannot be returned. A folder is written under a temporary
name and renamed into place (`segment.integrity.write_atomically`), so an interrupted run never leaves a
folder that a later run would trust, and its meta.json records the SHA-256 of every file, checked as
the slices are read: a damaged folder is moved aside and prepared again.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from segment.integrity import load_verified, sha256_file, write_atomically
from segment.volumes import DataError, DatasetSpec, find_volume_ids, load_raw_volume

SLICES_VERSION = "1"  # bump when the preparation below changes what it writes


@dataclass(frozen=True)
class Volume:
    """One prepared volume: axial slices at the working resolution."""

    id: str
    images: np.ndarray  # (Z, R, R) float32, normalised
    labels: np.ndarray  # (Z, R, R) uint8 class ids, 0 = background

    def slices_with(self, class_id: int) -> np.ndarray:
        """Indices of the slices that contain class `class_id`."""
        return np.flatnonzero((self.labels == class_id).any(axis=(1, 2)))


@dataclass(frozen=True)
class PreparedData:
    spec: DatasetSpec
    resolution: int
    volumes: tuple[Volume, ...]
    key: str  # content hash of the cache folder
    path: Path  # the cache folder
    source: Path  # the data folder the volumes came from
    built: bool = False  # True when this call prepared the slices, False when they came from the cache

    @property
    def ids(self) -> tuple[str, ...]:
        return tuple(v.id for v in self.volumes)

    def volume(self, volume_id: str) -> Volume:
        for v in self.volumes:
            if v.id == volume_id:
                return v
        raise DataError(f"volume {volume_id!r} is not in {self.source}; volumes are {list(self.ids)}")

    def label_file(self, volume_id: str) -> Path:
        return self.source / self.spec.label_pattern.format(id=volume_id)

    def summary(self) -> dict:
        """Volumes, slices and slices per class: what a person checks before training."""
        per_class = {name: int(sum(len(v.slices_with(cid)) for v in self.volumes))
                     for cid, name in enumerate(self.spec.classes, start=1)}
        return {"dataset": self.spec.name, "source": str(self.source), "resolution": self.resolution,
                "volumes": len(self.volumes), "slices": int(sum(len(v.images) for v in self.volumes)),
                "slices_per_class": per_class, "cache": str(self.path)}


def cache_key(spec: DatasetSpec, data_dir: Path, ids: list[str], resolution: int) -> str:
    """Hash of the code version, spec, resolution and the bytes of every file that goes in."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": SLICES_VERSION, "spec": spec.to_dict(), "resolution": resolution},
                        sort_keys=True).encode())
    for vid in ids:
        for pattern in (spec.image_pattern, spec.label_pattern):
            path = Path(data_dir) / pattern.format(id=vid)
            h.update(path.name.encode())
            h.update(sha256_file(path).encode() if path.is_file() else b"missing")
    return h.hexdigest()[:20]


def _resize(volume: np.ndarray, resolution: int, *, labels: bool) -> np.ndarray:
    """(Z, H, W) -> (Z, R, R): antialiased bilinear for intensities, nearest for labels."""
    x = torch.from_numpy(volume.astype(np.float32))[:, None]  # (Z, 1, H, W)
    if labels:
        y = F.interpolate(x, size=(resolution, resolution), mode="nearest-exact")
        return y[:, 0].round().to(torch.uint8).numpy()
    y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return y[:, 0].numpy().astype(np.float32)


def _normalise(spec: DatasetSpec, images: list[np.ndarray]) -> list[np.ndarray]:
    """MRI: per-volume z-score. CT: clip to the HU window, then one z-score over the whole dataset."""
    if spec.normalisation == "zscore":
        return [((im - im.mean()) / im.std()).astype(np.float32) for im in images]
    low, high = spec.window
    clipped = [np.clip(im, low, high) for im in images]
    n = sum(c.size for c in clipped)
    mean = sum(float(c.sum(dtype=np.float64)) for c in clipped) / n
    var = sum(float(((c - mean) ** 2).sum(dtype=np.float64)) for c in clipped) / n
    if var == 0.0:
        raise DataError(f"dataset {spec.name!r}: every voxel lies outside the window {spec.window}")
    return [((c - mean) / np.sqrt(var)).astype(np.float32) for c in clipped]


def prepare(spec: DatasetSpec, data_dir: str | Path, *, resolution: int, cache_dir: str | Path,
            min_volumes: int | None = None, force: bool = False) -> PreparedData:
    """Load every volume of `data_dir`, normalise and resize its slices, and cache them.

    All volumes are read and checked before anything is written. `min_volumes` defaults to the spec's
    number of folds: fewer volumes than folds cannot form the protocol. Cached slices are hash-checked
    as they are read; a bad folder is moved aside and prepared again, and `force` prepares it again anyway.
    """
    if resolution < 16 or resolution % 8:
        raise DataError(f"resolution must be a multiple of 8 and at least 16, got {resolution}")
    data_dir = Path(data_dir).resolve()
    ids = find_volume_ids(spec, data_dir)
    needed = spec.n_folds if min_volumes is None else min_volumes
    if len(ids) < needed:
        raise DataError(f"{data_dir}: {len(ids)} volume(s) found but spec {spec.name!r} has {spec.n_folds} folds; "
                        f"need at least {needed} volumes")
    key = cache_key(spec, data_dir, ids, resolution)
    folder = Path(cache_dir) / "slices" / f"{spec.name}-{resolution}-{key}"
    cached = None if force else load_verified(Path(cache_dir), folder, [_volume_file(vid) for vid in ids], load_npz)
    if cached is not None:
        volumes = tuple(_volume(vid, cached[_volume_file(vid)]) for vid in ids)
        return PreparedData(spec, resolution, volumes, key, folder, data_dir, built=False)

    raw = [load_raw_volume(spec, data_dir, vid) for vid in tqdm(ids, desc=f"read {spec.name}", unit="vol")]
    present = set().union(*(np.unique(lb).tolist() for _, lb in raw))
    absent = [f"{name!r} (raw value {raw_value})" for raw_value, name in sorted(spec.labels.items())
              if spec.class_id(name) not in present]
    if absent:
        raise DataError(f"{data_dir}: spec {spec.name!r} class(es) {', '.join(absent)} appear in no label file; "
                        f"fix the spec's [labels] or the data")
    images = _normalise(spec, [im for im, _ in raw])
    volumes = tuple(Volume(vid, _resize(im, resolution, labels=False), _resize(lb, resolution, labels=True))
                    for vid, im, (_, lb) in zip(ids, images, raw))
    write_atomically(folder, _save_volumes(volumes), {"key": key, "spec": spec.to_dict(), "resolution": resolution,
                                        "source": str(data_dir), "volumes": ids, "version": SLICES_VERSION},
                     root=Path(cache_dir), replace=force)
    return PreparedData(spec, resolution, volumes, key, folder, data_dir, built=True)


def _volume_file(vid: str) -> str:
    return f"volume_{vid}.npz"


def load_npz(data: bytes) -> dict[str, np.ndarray]:
    """The arrays of an npz file from its bytes (read and hash-checked once by `load_verified`)."""
    with np.load(io.BytesIO(data)) as z:
        return {name: z[name] for name in z.files}


def _volume(vid: str, arrays: dict[str, np.ndarray]) -> Volume:
    return Volume(vid, arrays["images"], arrays["labels"])


def _save_volumes(volumes: tuple[Volume, ...]) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        for v in volumes:
            np.savez(tmp / _volume_file(v.id), images=v.images, labels=v.labels)
    return fill
