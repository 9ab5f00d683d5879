"""Volumes as normalised 2D axial slices at a working resolution, cached on disk.

The cache folder is named by a content hash of everything that decides its contents: the slice code
version, the dataset spec, the resolution and the bytes of every image and label file. Changing any of
them gives a new folder, so stale slices cannot be returned. A folder is written under a temporary
name and renamed into place (`segment.data.integrity.write_atomically`), so an interrupted run never leaves a
folder that a later run would trust, and its meta.json records the SHA-256 of every file, checked as
the slices are read: a damaged folder is moved aside and prepared again.
"""

from __future__ import annotations

import hashlib
import io
import os
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from segment.config import RESOLUTIONS
from segment.data.integrity import load_verified, sha256_file, write_atomically
from segment.data.volumes import DataError, DatasetSpec, find_volume_ids, load_raw_volume

SLICES_VERSION = "3"  # bump when the preparation below changes what it writes (3: float64 z-score, native labels)


@dataclass(frozen=True)
class Volume:
    """One prepared volume: axial slices at the working resolution, plus its labels as loaded.

    `native_labels` keep the label file's in-plane size, so the protocol can score Dice on the grid the
    literature uses and take class ranges from labels that no down-sampling has thinned. Left out, they
    are `labels` (a volume whose working grid is its native grid, as in hand-made test volumes).
    """

    id: str
    images: np.ndarray  # (Z, R, R) float32, normalised
    labels: np.ndarray  # (Z, R, R) uint8 class ids, 0 = background
    native_labels: np.ndarray | None = None  # (Z, H0, W0) uint8 class ids at the label file's in-plane size

    def __post_init__(self) -> None:
        if self.native_labels is None:
            object.__setattr__(self, "native_labels", self.labels)
        if self.native_labels.shape[0] != self.labels.shape[0]:
            raise DataError(f"volume {self.id!r}: {self.native_labels.shape[0]} native label slices but "
                            f"{self.labels.shape[0]} working slices")

    def slices_with(self, class_id: int) -> np.ndarray:
        """Indices of the slices whose working-resolution labels contain class `class_id`."""
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
    import torch
    import torch.nn.functional as F

    x = torch.from_numpy(volume.astype(np.float32))[:, None]  # (Z, 1, H, W)
    if labels:
        y = F.interpolate(x, size=(resolution, resolution), mode="nearest-exact")
        return y[:, 0].round().to(torch.uint8).numpy()
    y = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False, antialias=True)
    return y[:, 0].numpy().astype(np.float32)


def _zscore(x: np.ndarray, mean: float, std: float) -> np.ndarray:
    return ((x - mean) / std).astype(np.float32)


def _normalise(spec: DatasetSpec, images: list[np.ndarray], files: list[str]) -> list[np.ndarray]:
    """MRI: per-volume z-score. CT: clip to the HU window, then one z-score over the whole dataset.

    In float64, after dividing by the largest |intensity| (a z-score does not change under scaling), so
    no finite intensity overflows: an image scaled by 1e30 gives the same slices as the original.
    """
    if spec.normalisation == "zscore":
        out = []
        for im, file in zip(images, files):
            x = im.astype(np.float64)
            x /= np.abs(x).max()
            out.append(_checked(_zscore(x, x.mean(), x.std()), file))
        return out
    low, high = spec.window
    clipped = [np.clip(im.astype(np.float64), low, high) for im in images]
    scale = max(float(np.abs(c).max()) for c in clipped) or 1.0
    clipped = [c / scale for c in clipped]
    n = sum(c.size for c in clipped)
    mean = sum(float(c.sum()) for c in clipped) / n
    var = sum(float(((c - mean) ** 2).sum()) for c in clipped) / n
    if var == 0.0:
        raise DataError(f"dataset {spec.name!r}: every voxel lies outside the window {spec.window}")
    return [_checked(_zscore(c, mean, np.sqrt(var)), file) for c, file in zip(clipped, files)]


def _checked(normalised: np.ndarray, file: str) -> np.ndarray:
    """A normalised volume must be finite and not constant: never silently all zeros."""
    if not np.isfinite(normalised).all() or float(normalised.std()) == 0.0:
        raise DataError(f"{file}: intensities cannot be normalised (the z-score is not finite or is constant)")
    return normalised


def memory_budget() -> int:
    """Bytes the prepared slices may take: half the machine's physical memory."""
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2


def _check_memory(spec: DatasetSpec, data_dir: Path, ids: list[str], resolution: int) -> None:
    """Refuse, before reading any voxel, slices that would not fit: slices x R x R x 4 bytes, twice
    (resized images and the working copies). Slice counts come from the NIfTI headers."""
    import nibabel

    n_slices = 0
    for vid in ids:
        try:
            n_slices += int(nibabel.load(data_dir / spec.image_pattern.format(id=vid)).shape[2])
        except Exception:  # an unreadable file is reported, with its reason, when it is loaded
            continue
    needed, budget = n_slices * resolution * resolution * 4 * 2, memory_budget()
    if needed > budget:
        raise DataError(f"resolution {resolution}: {n_slices} slices need about {needed / 1e9:.3g} GB, more than "
                        f"the {budget / 1e9:.3g} GB allowed (half the physical memory); lower the resolution")


def prepare(spec: DatasetSpec, data_dir: str | Path, *, resolution: int, cache_dir: str | Path,
            min_volumes: int | None = None, force: bool = False) -> PreparedData:
    """Load every volume of `data_dir`, normalise and resize its slices, and cache them.

    All volumes are read and checked before anything is written. `min_volumes` defaults to the spec's
    number of folds: fewer volumes than folds cannot form the protocol. Cached slices are hash-checked
    as they are read; a bad folder is moved aside and prepared again, and `force` prepares it again anyway.
    """
    if resolution not in RESOLUTIONS:
        raise DataError(f"resolution must be a multiple of {RESOLUTIONS.step} from {RESOLUTIONS.start} to "
                        f"{RESOLUTIONS[-1]}, got {resolution}")
    data_dir = Path(data_dir).resolve()
    ids = find_volume_ids(spec, data_dir)
    needed = spec.n_folds if min_volumes is None else min_volumes
    if len(ids) < needed:
        raise DataError(f"{data_dir}: {len(ids)} volume(s) found but spec {spec.name!r} has {spec.n_folds} folds; "
                        f"need at least {needed} volumes")
    key = cache_key(spec, data_dir, ids, resolution)
    folder = Path(cache_dir) / "slices" / f"{spec.name}-{resolution}-{key}"
    if folder.resolve().parent != folder.parent.resolve():  # specs check their names; this guards any other path
        raise DataError(f"spec name {spec.name!r} would place slices at {folder.resolve()}, outside the cache "
                        f"{folder.parent.resolve()}")
    cached = None if force else load_verified(Path(cache_dir), folder, [_volume_file(vid) for vid in ids], load_npz)
    if cached is not None:
        volumes = tuple(_volume(vid, cached[_volume_file(vid)]) for vid in ids)
        return PreparedData(spec, resolution, volumes, key, folder, data_dir, built=False)

    from tqdm import tqdm

    _check_memory(spec, data_dir, ids, resolution)  # from the headers, before any voxel is read
    raw = [load_raw_volume(spec, data_dir, vid) for vid in tqdm(ids, desc=f"read {spec.name}", unit="vol")]
    present = set().union(*(np.unique(lb).tolist() for _, lb in raw))
    absent = [f"{name!r} (raw value {raw_value})" for raw_value, name in sorted(spec.labels.items())
              if spec.class_id(name) not in present]
    if absent:
        raise DataError(f"{data_dir}: spec {spec.name!r} class(es) {', '.join(absent)} appear in no label file; "
                        f"fix the spec's [labels] or the data")
    files = [str(data_dir / spec.image_pattern.format(id=vid)) for vid in ids]
    images = _normalise(spec, [im for im, _ in raw], files)
    volumes = tuple(Volume(vid, _resize(im, resolution, labels=False), _resize(lb, resolution, labels=True), lb)
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
    return Volume(vid, arrays["images"], arrays["labels"], arrays["native_labels"])


def _save_volumes(volumes: tuple[Volume, ...]) -> Callable[[Path], None]:
    def fill(tmp: Path) -> None:
        for v in volumes:
            np.savez(tmp / _volume_file(v.id), images=v.images, labels=v.labels, native_labels=v.native_labels)
    return fill
