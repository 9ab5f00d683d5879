"""Tiny data and configs shared by the tests of `augment/` (random ellipse masks, images that follow them)."""
from __future__ import annotations

import numpy as np

from augment.ddpm import DDPMConfig
from augment.gan import GANConfig
from augment.manifest import Provenance, refs
from segment.data.phantom import phantom_volume

RES = 32


def phantom_volumes(n: int = 3, res: int = RES, depth: int = 8) -> dict[str, np.ndarray]:
    """Volumes "1".."n" of the phantom `(depth, res, res)`, z-scored: unlabelled images for registration."""
    out = {}
    for i in range(1, n + 1):
        image, _ = phantom_volume(0, i, size=res, depth=depth)
        out[str(i)] = ((image - image.mean()) / image.std()).astype(np.float32)
    return out


def ellipse_masks(n: int, res: int = RES, seed: int = 0) -> np.ndarray:
    """`n` random filled ellipses `(n, 1, res, res)` float32 in {0, 1}, each well inside the image."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:res, :res]
    out = np.zeros((n, 1, res, res), np.float32)
    for k in range(n):
        cy, cx = rng.uniform(0.35, 0.65, 2) * res
        ry, rx = rng.uniform(0.12, 0.25, 2) * res
        out[k, 0] = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
    return out


def images_for(masks: np.ndarray, seed: int = 0) -> np.ndarray:
    """Images that follow their masks: bright organ on a darker, noisy background."""
    rng = np.random.default_rng(seed)
    return (masks * 2.0 - 0.5 + 0.2 * rng.standard_normal(masks.shape)).astype(np.float32)


def tiny_ddpm(**changes) -> DDPMConfig:
    base = dict(resolution=RES, block_channels=(8, 16), batch_size=4, pretrain_steps=4, finetune_steps=2,
                sample_steps=3, sample_batch=8)
    return DDPMConfig(**{**base, **changes})


def tiny_gan(**changes) -> GANConfig:
    base = dict(resolution=RES, z_dim=8, gen_channels=16, n_up=2, disc_channels=8, disc_layers=2,
                batch_size=4, pretrain_steps=4, finetune_steps=2)
    return GANConfig(**{**base, **changes})


def provenance(n_pre: int, n_fine: int, *, pre_volume: str = "1", fine_volume: str = "2",
               queries: tuple[str, ...] = ("3", "4")) -> Provenance:
    return Provenance(fold=0, class_name="liver", setting=1, pretrain=refs(pre_volume, range(n_pre)),
                      finetune=refs(fine_volume, range(n_fine)), query_volumes=queries)
