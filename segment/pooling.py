"""Pieces shared by the few-shot segmenters: input checks, masked pooling, cosine scoring, SE gates.

Masked average pooling and the cosine decision follow PANet (Wang et al., ICCV 2019); local prototypes
on a grid follow SSL-ALPNet (Ouyang et al., ECCV 2020); the squeeze-and-excite gates follow Hu et al.
(CVPR 2018) for channels and Roy et al. (MICCAI 2018) for space.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class SegmentInputError(ValueError):
    """A support set or query batch that a segmenter cannot use."""


def check_episode(support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor,
                  *, resolution: int | None = None) -> None:
    """Raise `SegmentInputError` naming the problem unless the tensors form a usable episode.

    Expects support images and masks `(S, 1, H, W)` with S >= 1, masks in [0, 1] holding both
    foreground and background, and queries `(Q, 1, H, W)` at the supports' (and model's) resolution.
    """
    if support_images.ndim != 4 or support_images.shape[1] != 1:
        raise SegmentInputError(f"support_images must have shape (S, 1, H, W), got {tuple(support_images.shape)}")
    if support_images.shape[0] == 0:
        raise SegmentInputError("k = 0 supports: support_images is empty (shape "
                                f"{tuple(support_images.shape)}); at least one labelled support is needed")
    if support_masks.shape != support_images.shape:
        raise SegmentInputError(f"support_masks has shape {tuple(support_masks.shape)} but support_images has "
                                f"shape {tuple(support_images.shape)}; each mask must be the size of its image")
    if query_images.ndim != 4 or query_images.shape[1] != 1:
        raise SegmentInputError(f"query_images must have shape (Q, 1, H, W), got {tuple(query_images.shape)}")
    if query_images.shape[-2:] != support_images.shape[-2:]:
        raise SegmentInputError(f"query_images have resolution {tuple(query_images.shape[-2:])} but the supports "
                                f"have {tuple(support_images.shape[-2:])}; resize the queries to match")
    if resolution is not None and tuple(query_images.shape[-2:]) != (resolution, resolution):
        raise SegmentInputError(f"query_images have resolution {tuple(query_images.shape[-2:])} but the model "
                                f"was built for {resolution} x {resolution}")
    if support_masks.min() < 0 or support_masks.max() > 1:
        raise SegmentInputError(f"support_masks must lie in [0, 1], got values in "
                                f"[{float(support_masks.min())}, {float(support_masks.max())}]")
    fg = support_masks.flatten(1).sum(1)
    for i, total in enumerate(fg.tolist()):
        if total == 0:
            raise SegmentInputError(f"support_masks[{i}] is empty (no foreground pixel); a support mask must mark "
                                    "the class to segment")
        if total >= support_masks[i].numel():
            raise SegmentInputError(f"support_masks[{i}] is all foreground; a support mask needs background "
                                    "pixels to pool a background prototype")


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, 1, H, W) -> (N, 1, h, w): area downsampling keeps each feature cell's mask coverage in [0, 1]."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks
    return F.adaptive_avg_pool2d(masks, size)


def masked_average_pool(features: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Pool features `(S, C, h, w)` under soft masks `(S, 1, h, w)` into one prototype `(C,)`.

    PANet eq. 1: p = sum_x F(x) M(x) / sum_x M(x), summed over every support and pixel.
    """
    return (features * masks).sum(dim=(0, 2, 3)) / masks.sum().clamp_min(1e-5)


def local_prototypes(features: torch.Tensor, masks: torch.Tensor, *, kernel: int, threshold: float) -> torch.Tensor:
    """Grid-pooled prototypes `(P, C)` from cells whose mask coverage exceeds `threshold` (ALPNet sec. 3.3).

    features `(S, C, h, w)`, masks `(S, 1, h, w)`; P may be 0 when no cell is covered enough.
    """
    pooled = F.avg_pool2d(features, kernel, stride=kernel)  # (S, C, h/k, w/k)
    coverage = F.avg_pool2d(masks, kernel, stride=kernel)  # (S, 1, h/k, w/k)
    keep = (coverage > threshold).flatten()  # (S * h/k * w/k,)
    cells = pooled.permute(0, 2, 3, 1).reshape(-1, pooled.shape[1])  # (S * h/k * w/k, C)
    return cells[keep]


def cosine_scores(features: torch.Tensor, prototypes: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Score every pixel of `(Q, C, h, w)` against prototypes `(P, C)`: `(Q, h, w)`.

    PANet eq. 2: d = scale * cos(F(x), p). With several (local) prototypes, ALPNet's soft maximum
    sum_p softmax_p(d_p) d_p combines them.
    """
    q = F.normalize(features, dim=1)
    p = F.normalize(prototypes, dim=1)
    dists = scale * torch.einsum("qchw,pc->qphw", q, p)  # (Q, P, h, w)
    if dists.shape[1] == 1:
        return dists[:, 0]
    return (F.softmax(dists, dim=1) * dists).sum(dim=1)


class ChannelGate(nn.Module):
    """Channel excitation from a conditioning map (Hu et al. 2018, eq. 2-3): sigmoid(W2 relu(W1 z))."""

    def __init__(self, *, in_channels: int, out_channels: int, reduction: int = 2) -> None:
        super().__init__()
        hidden = max(in_channels // reduction, 4)
        self.fc = nn.Sequential(nn.Linear(in_channels, hidden), nn.ReLU(inplace=True),
                                nn.Linear(hidden, out_channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = x.mean(dim=(2, 3))  # squeeze: (N, C)
        return self.fc(z)[:, :, None, None]  # excite: (N, C_out, 1, 1)


class SpatialGate(nn.Module):
    """Spatial excitation (Roy et al. 2018, sSE): sigmoid of a 1x1 convolution, one weight per pixel."""

    def __init__(self, *, in_channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 1, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.conv(x))  # (N, 1, h, w)
