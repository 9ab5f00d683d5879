"""Felzenszwalb superpixels per slice, the pseudo-labels of self-supervised episodes (SSL-ALPNet).

Each slice of a prepared volume is over-segmented with skimage's Felzenszwalb graph method; segments
lying mostly outside the body (air) get label 0, the others 1..K per slice. The maps are cached beside
the prepared slices under a folder named by a hash of the slice cache key, the parameters and this
module's version, written under a temporary name and renamed, so a stale or partial cache is never read.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy import ndimage
from skimage.segmentation import felzenszwalb
from tqdm import tqdm

from segment.config import SuperpixelParams  # noqa: F401 (re-exported)
from segment.slices import write_atomically

SUPERPIXELS_VERSION = "1"  # bump when the computation below changes what it writes


def body_mask(image: np.ndarray) -> np.ndarray:
    """(H, W) bool: pixels brighter than the air floor, holes filled, largest component only."""
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


def superpixels(data, *, params: SuperpixelParams = SuperpixelParams(), cache_dir: str | Path,
                volume_ids: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """Superpixel maps `{volume id: (Z, R, R) int32}` of `data` (a `PreparedData`), cached on disk.

    The folder key hashes the prepared-data key, the parameters and the code version; all volumes of
    `data` are computed together so one folder serves every fold.
    """
    key = hashlib.sha256(json.dumps({"data": data.key, "params": asdict(params), "version": SUPERPIXELS_VERSION},
                                    sort_keys=True).encode()).hexdigest()[:20]
    folder = Path(cache_dir) / "superpixels" / f"{data.spec.name}-{data.resolution}-{key}"
    if not (folder / "meta.json").is_file():
        maps = {v.id: volume_superpixels(v.images, params)
                for v in tqdm(data.volumes, desc="superpixels", unit="vol", leave=False)}
        def fill(tmp: Path) -> None:
            for vid, segments in maps.items():
                np.savez_compressed(tmp / f"superpixels_{vid}.npz", segments=segments)

        write_atomically(folder, fill, {"key": key, "data": data.key, "params": asdict(params)})
    wanted = data.ids if volume_ids is None else volume_ids
    out = {}
    for vid in wanted:
        with np.load(folder / f"superpixels_{vid}.npz") as z:
            out[vid] = z["segments"]
    return out
