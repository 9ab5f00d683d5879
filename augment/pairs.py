"""Validation of (image, mask) pairs before any generator touches them.

Every public entry point of `augment` calls `as_pairs` first, so a bad input fails with a message that names
the argument, its value and what was expected, before anything is written to disk.
"""
from __future__ import annotations

import numpy as np
import torch

ArrayLike = np.ndarray | torch.Tensor


class PairError(ValueError):
    """An (image, mask) array does not meet the contract `(N, 1, H, W)` float32, binary masks, finite images."""


def _as_tensor(x: ArrayLike, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise PairError(f"{name} must be a numpy array or torch tensor, got {type(x).__name__}")
    if x.ndim != 4 or x.shape[1] != 1:
        raise PairError(f"{name} must have shape (N, 1, H, W), got {tuple(x.shape)}")
    return x.detach().to(torch.float32).cpu()


def check_masks(masks: ArrayLike, name: str = "masks", *, resolution: int | None = None) -> torch.Tensor:
    """Masks `(N, 1, H, W)` with values in {0, 1}, each neither empty nor all foreground."""
    m = _as_tensor(masks, name)
    if m.shape[0] == 0:
        raise PairError(f"{name} holds 0 masks; at least one is needed")
    if resolution is not None and tuple(m.shape[-2:]) != (resolution, resolution):
        raise PairError(f"{name} are {m.shape[-2]}x{m.shape[-1]}, expected {resolution}x{resolution}")
    bad = ~((m == 0) | (m == 1))
    if bad.any():
        values = torch.unique(m[bad])[:5].tolist()
        raise PairError(f"{name} must be binary (0 or 1); found values such as {values}")
    area = m.flatten(1).sum(1)
    if (area == 0).any():
        raise PairError(f"{name} {torch.nonzero(area == 0).flatten()[:10].tolist()} are empty (no foreground pixel)")
    full = m[0].numel()
    if (area == full).any():
        raise PairError(f"{name} {torch.nonzero(area == full).flatten()[:10].tolist()} are all foreground")
    return m


def check_images(images: ArrayLike, name: str = "images", *, resolution: int | None = None) -> torch.Tensor:
    """Images `(N, 1, H, W)` with only finite values."""
    x = _as_tensor(images, name)
    if x.shape[0] == 0:
        raise PairError(f"{name} holds 0 images; at least one is needed")
    if resolution is not None and tuple(x.shape[-2:]) != (resolution, resolution):
        raise PairError(f"{name} are {x.shape[-2]}x{x.shape[-1]}, expected {resolution}x{resolution}")
    if not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).flatten(1).any(1).sum())
        raise PairError(f"{name} contain NaN or infinite values in {n_bad} of {x.shape[0]} images")
    return x


def as_pairs(pairs: tuple[ArrayLike, ArrayLike], name: str = "pairs", *, resolution: int | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Check `(images, masks)` and return them as float32 CPU tensors of identical shape `(N, 1, H, W)`."""
    if not isinstance(pairs, (tuple, list)) or len(pairs) != 2:
        raise PairError(f"{name} must be a tuple (images, masks), got {type(pairs).__name__}")
    images = check_images(pairs[0], f"{name} images", resolution=resolution)
    masks = check_masks(pairs[1], f"{name} masks", resolution=resolution)
    if images.shape != masks.shape:
        raise PairError(f"{name}: images {tuple(images.shape)} and masks {tuple(masks.shape)} differ in shape")
    return images, masks
