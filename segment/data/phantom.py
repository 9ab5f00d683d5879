"""A procedural abdominal MRI phantom: the built-in data for the demo and the tests.

Each volume has a body outline with textured soft tissue, four organ-like structures (liver, right and
left kidney, spleen; label ids 1..4 as in CHAOS T2), a multiplicative bias field and Rician noise. It is
written as NIfTI in the same layout as the real data, with a `dataset.toml` spec beside it, so every
consumer goes through the real loading code. Volume i of seed s is a pure function of (s, i).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from segment.data.volumes import SPEC_DIR, DataError

PHANTOM_VERSION = "1"  # bump when a change below changes the files: cached phantoms are then rebuilt

# name, label id, centre (z, y, x) and semi-axes as fractions of the volume, mean intensity
_ORGANS = (
    ("liver", 1, (0.55, 0.45, 0.33), (0.30, 0.20, 0.17), 0.35),
    ("right_kidney", 2, (0.38, 0.60, 0.36), (0.20, 0.08, 0.06), 0.85),
    ("left_kidney", 3, (0.40, 0.60, 0.64), (0.20, 0.08, 0.06), 0.85),
    ("spleen", 4, (0.62, 0.55, 0.68), (0.18, 0.09, 0.08), 0.65),
)


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, ...], sigma: float) -> np.ndarray:
    """Zero-mean, unit-std smooth random field."""
    from scipy.ndimage import gaussian_filter

    field = gaussian_filter(rng.standard_normal(shape), sigma)
    return (field - field.mean()) / (field.std() + 1e-8)


def phantom_volume(seed: int, index: int, *, size: int = 96, depth: int = 24) -> tuple[np.ndarray, np.ndarray]:
    """One phantom volume: image (Z, H, W) float32 and labels (Z, H, W) uint8."""
    rng = np.random.default_rng([seed, index])
    z, y, x = np.meshgrid(np.linspace(0, 1, depth), np.linspace(0, 1, size), np.linspace(0, 1, size),
                          indexing="ij")  # each (Z, H, W)
    # 1. body outline: an ellipse per slice whose size changes slowly along z
    ry = 0.33 + 0.03 * np.sin(np.pi * z + rng.uniform(0, np.pi)) + rng.uniform(-0.02, 0.02)
    rx = 0.44 + rng.uniform(-0.03, 0.03)
    body = ((y - 0.5) / ry) ** 2 + ((x - 0.5) / rx) ** 2 <= 1.0
    image = np.where(body, 0.5 + 0.06 * _smooth_noise(rng, z.shape, 2.0), 0.02)
    labels = np.zeros(z.shape, dtype=np.uint8)
    # 2. organs: deformed ellipsoids with their own texture, drawn in order (later ones win overlaps)
    for _, label_id, centre, axes, intensity in _ORGANS:
        c = np.asarray(centre) + rng.uniform(-0.04, 0.04, 3)
        a = np.asarray(axes) * rng.uniform(0.85, 1.15, 3)
        implicit = ((z - c[0]) / a[0]) ** 2 + ((y - c[1]) / a[1]) ** 2 + ((x - c[2]) / a[2]) ** 2
        organ = (implicit + 0.25 * _smooth_noise(rng, z.shape, 3.0) <= 1.0) & body
        labels[organ] = label_id
        texture = 0.05 * _smooth_noise(rng, z.shape, 1.0)
        image = np.where(organ, intensity * rng.uniform(0.9, 1.1) + texture, image)
    # 3. acquisition: smooth multiplicative bias field, then Rician noise
    bias = 1.0 + 0.15 * _smooth_noise(rng, z.shape, 8.0)
    image = image * bias
    noise = 0.03
    image = np.hypot(image + noise * rng.standard_normal(z.shape), noise * rng.standard_normal(z.shape))
    return (1000.0 * image).astype(np.float32), labels


def write_phantom(out_dir: str | Path, *, n_volumes: int = 8, size: int = 96, depth: int = 24, seed: int = 0,
                  n_folds: int = 2) -> list[Path]:
    """Write `n_volumes` phantom volumes as image_N/label_N .nii.gz plus dataset.toml; returns the paths.

    `out_dir` must be new or an empty folder: the phantom never overwrites or mixes with other files.
    """
    for name, value, low, high in (("volumes", n_volumes, 1, 200), ("size", size, 16, 512), ("depth", depth, 6, 256),
                                   ("seed", seed, 0, 2**32 - 1), ("n_folds", n_folds, 1, n_volumes)):
        if not low <= value <= high:
            raise DataError(f"phantom {name} = {value}; it must be in {low}..{high}")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"phantom: {out} exists and is not a folder; give a new or empty folder")
    if out.is_dir() and any(out.iterdir()):
        raise DataError(f"phantom: {out} is not empty; refusing to overwrite or mix with its files, give a new "
                        f"or empty folder")
    import nibabel

    out.mkdir(parents=True, exist_ok=True)
    affine = np.diag([1.25 * 256 / size, 1.25 * 256 / size, 7.7, 1.0])
    written = []
    for i in range(1, n_volumes + 1):
        image, labels = phantom_volume(seed, i, size=size, depth=depth)
        # NIfTI order is (X, Y, Z); the loader turns it back into (Z, H, W).
        for name, array in (("image", image), ("label", labels)):
            path = out / f"{name}_{i}.nii.gz"
            nibabel.save(nibabel.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine), path)
            written.append(path)
    spec_path = out / "dataset.toml"
    spec_text = (SPEC_DIR / "phantom.toml").read_text()
    spec_path.write_text(spec_text.replace("n_folds = 2", f"n_folds = {n_folds}"))
    return written + [spec_path]
