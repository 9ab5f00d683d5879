"""Mask sources: new masks made by deforming real support masks, and the classical-augmentation control.

A generator draws an image for each deformed mask, so every synthetic image has an exact label. The control
arm applies the very same deformations to the support image and its mask together (no generator); every
generator has to beat it downstream. Deformations are albumentations' affine, elastic (Simard et al. 2003)
and grid distortions. Each source mask first loses its fragments (connected components) under
`drop_fragment_px` pixels, the largest one excepted: a real label can hold stray pixels (CHAOS fold 3, left
kidney: 326 px plus two 1-px specks at 128 px) that no deformation keeps intact. A deformed mask is kept
only if it is non-empty, its area stays within [min_area_ratio, max_area_ratio] of its source, and it is
not shredded, judged against its own source: no more components than the source, and no more small ones
(under `min_fragment_px`) than the source already has.
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


def drop_fragments(mask: np.ndarray, below_px: int) -> tuple[np.ndarray, int]:
    """`mask` (H, W) without its components under `below_px` pixels (never the largest); and how many went."""
    labels, n = ndimage.label(mask)
    if n < 2 or below_px <= 0:
        return mask, 0
    sizes = np.bincount(labels.ravel())[1:]                     # (n,) pixels per component
    tiny = (sizes < below_px) & (np.arange(n) != sizes.argmax())
    if not tiny.any():
        return mask, 0
    return (mask * ~np.isin(labels, np.flatnonzero(tiny) + 1)).astype(mask.dtype), int(tiny.sum())


def mask_problem(mask: np.ndarray, source: np.ndarray, config: DeformConfig) -> str | None:
    """Why a deformed `mask` (H, W) is implausible for its `source` (H, W), or None if it is fine.

    Fragments are judged against the source: a small fragment the source already has is not damage.
    """
    area, src_area = int(mask.sum()), int(source.sum())
    if area == 0:
        return "empty"
    if area == mask.size:
        return "all foreground"
    ratio = area / src_area
    if not config.min_area_ratio <= ratio <= config.max_area_ratio:
        return f"area ratio {ratio:.2f} outside [{config.min_area_ratio}, {config.max_area_ratio}]"
    sizes, src_sizes = _component_sizes(mask), _component_sizes(source)
    small, src_small = int((sizes < config.min_fragment_px).sum()), int((src_sizes < config.min_fragment_px).sum())
    if len(sizes) > len(src_sizes) or small > src_small:
        return (f"shredded: {len(sizes)} components (source {len(src_sizes)}), {small} under "
                f"{config.min_fragment_px} px (source {src_small}), smallest {sizes.min()} px")
    return None


def _component_sizes(mask: np.ndarray) -> np.ndarray:
    labels, _ = ndimage.label(mask)
    return np.bincount(labels.ravel())[1:]  # (components,) pixels each


def _deform(images: np.ndarray | None, masks: np.ndarray, n: int, config: DeformConfig, seed: int
            ) -> tuple[np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
    """Draw `n` plausible deformations, cycling over the sources; images follow their mask when given.

    Returns images and masks `(n, 1, H, W)`, the source index of each, and the number of fragments
    dropped from each source mask `(S,)`.
    """
    res = masks.shape[-1]
    transform = _transform(config, res, seed)
    cleaned = [drop_fragments(m[0].astype(np.uint8), config.drop_fragment_px) for m in masks]
    out_m = np.zeros((n, 1, res, res), np.float32)
    out_i = None if images is None else np.zeros((n, 1, res, res), np.float32)
    source = np.arange(n) % masks.shape[0]
    for k, s in enumerate(source):
        src_mask = cleaned[s][0]
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
    return out_i, out_m, source, np.array([d for _, d in cleaned], np.int64)


def deform_masks(masks: ArrayLike, n: int, *, config: DeformConfig = DeformConfig(), seed: int = 0
                 ) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """`n` new masks `(n, 1, H, W)` from the real `masks` `(S, 1, H, W)`, the source index of each, and the
    number of tiny fragments dropped from each source `(S,)`."""
    m = check_masks(masks, "masks")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    _, out, source, dropped = _deform(None, m.numpy(), n, config, seed)
    return torch.from_numpy(out), source, dropped


def classical_pairs(images: ArrayLike, masks: ArrayLike, n: int, *, config: DeformConfig = DeformConfig(),
                    seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, np.ndarray]:
    """The control arm: the same deformations applied to each support image and its mask together.

    Returns images `(n, 1, H, W)`, masks `(n, 1, H, W)`, the source index of each pair and the number of
    tiny fragments dropped from each source mask `(S,)`.
    """
    x = check_images(images, "images")
    m = check_masks(masks, "masks")
    if x.shape != m.shape:
        raise PairError(f"images {tuple(x.shape)} and masks {tuple(m.shape)} differ in shape")
    if n < 1:
        raise PairError(f"n must be >= 1, got {n}")
    out_i, out_m, source, dropped = _deform(x.numpy(), m.numpy(), n, config, seed)
    return torch.from_numpy(out_i), torch.from_numpy(out_m), source, dropped
