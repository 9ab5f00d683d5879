"""Felzenszwalb superpixels per slice, the pseudo-labels of self-supervised episodes (SSL-ALPNet).

Each slice of a prepared volume is over-segmented with skimage's Felzenszwalb graph method; segments
lying mostly outside the body (air) get label 0, the others 1..K per slice. The maps are cached beside
the prepared slices under a folder named by a hash of the slice cache key, the parameters and this
module's version, written under a temporary name and renamed, so a stale or partial cache is never read,
with the SHA-256 of every map recorded and checked on read, so a damaged one is never used.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from segment.config import SuperpixelParams  # noqa: F401 (re-exported)
from segment.data.integrity import load_verified, write_atomically
from segment.data.slices import load_npz

SUPERPIXELS_VERSION = "1"  # bump when the computation below changes what it writes


def body_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels brighter than the air floor, holes filled, largest component only."""
    from scipy import ndimage

    floor = float(image.min())
    spread = float(image.max()) - floor
    mask = ndimage.binary_fill_holes(image > floor + 0.05 * spread)
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = ndimage.sum_labels(mask, labels, index=np.arange(1, n + 1))
    return labels == (int(np.argmax(sizes)) + 1)


def slice_superpixels(image: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """One slice (H, W) float -> (H, W) int32 segments 1..K inside the body, 0 outside."""
    from skimage.segmentation import felzenszwalb
    segments = felzenszwalb(image.astype(np.float64), scale=params.scale, sigma=params.sigma,
                            min_size=params.min_size(image.shape[-1]))
    body = body_mask(image)
    counts = np.bincount(segments.ravel())
    inside = np.bincount(segments.ravel(), weights=body.ravel().astype(np.float64), minlength=len(counts))
    keep = inside >= params.body_fraction * np.maximum(counts, 1)
    relabel = np.zeros(len(counts), dtype=np.int32)
    relabel[keep] = np.arange(1, int(keep.sum()) + 1)
    return relabel[segments]


def volume_superpixels(images: np.ndarray, params: SuperpixelParams) -> np.ndarray:
    """(Z, H, W) -> (Z, H, W) int32, slice by slice (Felzenszwalb is 2D, as in ALPNet)."""
    return np.stack([slice_superpixels(im, params) for im in images])


def superpixel_folder(data, params: SuperpixelParams, cache_dir: str | Path) -> Path:
    """The cache folder of the superpixel maps of `data` (a `PreparedData`) under `params`."""
    key = hashlib.sha256(json.dumps({"data": data.key, "params": asdict(params), "version": SUPERPIXELS_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:20]
    return Path(cache_dir) / "superpixels" / f"{data.spec.name}-{data.resolution}-{key}"


def superpixels(data, *, params: SuperpixelParams = SuperpixelParams(), cache_dir: str | Path,
                volume_ids: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Superpixel maps `{volume id: (Z, R, R) int32}` of `data` (a `PreparedData`), cached on disk.

    The folder key hashes the prepared-data key, the parameters and the code version; all volumes of
    `data` are computed together so one folder serves every fold. The maps read are hash-checked
    against the folder's record; a bad folder is moved aside and computed again.
    """
    folder = superpixel_folder(data, params, cache_dir)
    wanted = data.ids if volume_ids is None else volume_ids
    cached = load_verified(Path(cache_dir), folder, [_file(vid) for vid in wanted], load_npz)
    if cached is not None:
        return {vid: cached[_file(vid)]["segments"] for vid in wanted}
    from tqdm import tqdm

    maps = {v.id: volume_superpixels(v.images, params)
            for v in tqdm(data.volumes, desc="superpixels", unit="vol", leave=False)}

    def fill(tmp: Path) -> None:
        for vid, segments in maps.items():
            np.savez_compressed(tmp / _file(vid), segments=segments)

    write_atomically(folder, fill, {"key": folder.name.rsplit("-", 1)[1], "data": data.key, "params": asdict(params)},
                     root=Path(cache_dir))
    return {vid: maps[vid] for vid in wanted}


def _file(vid: str) -> str:
    return f"superpixels_{vid}.npz"
