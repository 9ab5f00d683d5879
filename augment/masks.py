"""Mask sources: new masks made by deforming real support masks, and the classical-augmentation control.

A generator draws an image for each deformed mask, so every synthetic image has an exact label. The control
arm applies the very same deformations to the support image and its mask together (no generator); every
generator has to beat it downstream. Deformations are albumentations' affine, elastic (Simard et al. 2003)
and grid distortions; a deformed mask is kept only if it is non-empty, its area stays within
[min_area_ratio, max_area_ratio] of its source, and it is not shredded (no more connected components than
the source and none smaller than `min_fragment_px`).
"""
from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
import torch
from scipy import ndimage

from augment.config import DeformConfig  # noqa: F401 (re-exported)
from augment.pairs import ArrayLike, PairError, check_images, check_masks


def _transform(config: DeformConfig, resolution: int, seed: int) -> A.Compose:
    px = resolution / 128.0  # strengths are stated for 128 x 128
    border = cv2.BORDER_CONSTANT
    return A.Compose([
        A.Affine(scale=config.scale, translate_percent=(-config.translate_frac, config.translate_frac),
                 rotate=(-config.rotate_deg, config.rotate_deg), border_mode=border, p=1.0),
        A.ElasticTransform(alpha=config.elastic_alpha * px, sigma=config.elastic_sigma * px,
                           border_mode=border, p=1.0),
        A.GridDistortion(num_steps=5, distort_limit=config.grid_distort, border_mode=border, p=0.5),
    ], seed=seed)


def mask_problem(mask: np.ndarray, source: np.ndarray, config: DeformConfig) -> str | None:
    """Why a deformed `mask` (H, W) is implausible for its `source` (H, W), or None if it is fine."""
    area, src_area = int(mask.sum()), int(source.sum())
    if area == 0:
        return "empty"
    if area == mask.size:
        return "all foreground"
    ratio = area / src_area
    if not config.min_area_ratio <= ratio <= config.max_area_ratio:
        return f"area ratio {ratio:.2f} outside [{config.min_area_ratio}, {config.max_area_ratio}]"
    labels, n = ndimage.label(mask)
    _, n_src = ndimage.label(source)
    sizes = np.bincount(labels.ravel())[1:]
    if n > n_src or sizes.min() < min(config.min_fragment_px, src_area):
        return f"shredded: {n} components (source {n_src}), smallest {sizes.min()} px"
    return None


def _deform(images: np.ndarray | None, masks: np.ndarray, n: int, config: DeformConfig, seed: int
            ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    """Draw `n` plausible deformations, cycling over the sources; images follow their mask when given."""
    res = masks.shape[-1]
    transform = _transform(config, res, seed)
    out_m = np.zeros((n, 1, res, res), np.float32)
    out_i = None if images is None else np.zeros((n, 1, res, res), np.float32)
    source = np.arange(n) % masks.shape[0]
    for k, s in enumerate(source):
        src_mask = masks[s, 0].astype(np.uint8)
        # fill outside the field of view with the image minimum (MRI background), not zero (a z-score mean)
        src_img = np.zeros_like(src_mask, np.float32) if images is None else images[s, 0]
        problems = []
        for _ in range(config.max_tries):
            lo = float(src_img.min())
            out = transform(image=src_img - lo, mask=src_mask)
            problem = mask_problem(out["mask"], src_mask, config)
            if problem is None:
                break
            problems.append(problem)
        else:
            raise PairError(f"could not deform source mask {s} plausibly in {config.max_tries} tries "
                            f"(last problems: {problems[-3:]}); weaken DeformConfig or check the mask")
        out_m[k, 0] = out["mask"]
        if out_i is not None:
            out_i[k, 0] = out["image"] + lo
    return out_i, out_m, source


def deform_masks(masks: ArrayLike, n: int, *, config: DeformConfig = DeformConfig(), seed: int = 0
                 ) -> tuple[torch.Tensor, np.ndarray]:
    """`n` new masks `(n, 1, H, W)` from the real `masks` `(S, 1, H, W)` and the source index of each."""
    m = check_masks(masks, "masks")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    _, out, source = _deform(None, m.numpy(), n, config, seed)
    return torch.from_numpy(out), source


def classical_pairs(images: ArrayLike, masks: ArrayLike, n: int, *, config: DeformConfig = DeformConfig(),
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
    """The control arm: the same deformations applied to each support image and its mask together.

    Returns images `(n, 1, H, W)`, masks `(n, 1, H, W)` and the source index of each pair.
    """
    x = check_images(images, "images")
    m = check_masks(masks, "masks")
    if x.shape != m.shape:
        raise PairError(f"images {tuple(x.shape)} and masks {tuple(m.shape)} differ in shape")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    out_i, out_m, source = _deform(x.numpy(), m.numpy(), n, config, seed)
    return torch.from_numpy(out_i), torch.from_numpy(out_m), source
