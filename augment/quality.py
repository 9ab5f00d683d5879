"""Quality measures for synthetic pairs, each one function.

- `feature_frechet_distance`: Frechet distance (Dowson & Landau 1982; the FID formula of Heusel et al. 2017)
  between real and synthetic feature statistics. The features come from a small convolutional denoising
  autoencoder that the project trains itself on real images (`train_feature_encoder`): NO downloaded or
  pretrained weights are used (none may be downloaded here), so values are comparable only between runs
  that share the same encoder, never with published FID numbers.
- `mask_consistency`: how well a segmenter given only the real supports recovers the intended mask on each
  synthetic image (Dice). The segmenter is a callable `(support_images, support_masks, query_images) ->
  query_masks`, so `augment` never imports `segment`.
- `intensity_histogram_distance`: total-variation distance between intensity histograms (optionally inside
  the masks only).
- `nearest_neighbour_distance`: how close each synthetic image is to its nearest training image
  (a memorisation check).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import linalg
from torch import nn

from augment.pairs import PairError, as_pairs, check_images

Segmenter = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class EncoderConfig:
    channels: tuple[int, ...] = (16, 32, 64, 64)
    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    noise_std: float = 0.3
    seed: int = 0


class FeatureEncoder(nn.Module):
    """Strided conv encoder; `features` = channel means and standard deviations of its last map."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        layers, c_in = [], 1
        for c in config.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(4, c), nn.SiLU()]
            c_in = c
        self.encoder = nn.Sequential(*layers)
        dec = []
        for c in reversed(config.channels[:-1]):
            dec += [nn.Upsample(scale_factor=2), nn.Conv2d(c_in, c, 3, padding=1), nn.SiLU()]
            c_in = c
        self.decoder = nn.Sequential(*dec, nn.Upsample(scale_factor=2), nn.Conv2d(c_in, 1, 3, padding=1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.encoder(x))  # (B, 1, H, W) reconstruction

    @torch.no_grad()
    def features(self, x: torch.Tensor, batch_size: int = 64) -> np.ndarray:
        out = []
        for chunk in x.split(batch_size):
            h = self.encoder(chunk)                                    # (B, C, h, w)
            out.append(torch.cat([h.mean((2, 3)), h.std((2, 3))], 1))  # (B, 2C)
        return torch.cat(out).numpy().astype(np.float64)


def train_feature_encoder(images, config: EncoderConfig = EncoderConfig()) -> FeatureEncoder:
    """Train the encoder as a denoising autoencoder on real images `(N, 1, H, W)` (no external weights)."""
    x = check_images(images, "images")
    if x.shape[-1] % 2 ** len(config.channels):
        raise PairError(f"images are {x.shape[-1]} px; need a multiple of {2 ** len(config.channels)}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = FeatureEncoder(config)
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr)
    for _ in range(config.steps):
        batch = x[torch.randint(0, len(x), (config.batch_size,), generator=gen)]
        noisy = batch + config.noise_std * torch.randn(batch.shape, generator=gen)
        loss = F.mse_loss(model(noisy), batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return model.eval()


def frechet_distance(feats_a: np.ndarray, feats_b: np.ndarray, eps: float = 1e-6) -> float:
    """||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))  (Dowson & Landau 1982; Heusel et al. 2017)."""
    if len(feats_a) < 2 or len(feats_b) < 2:
        raise PairError(f"need at least 2 samples per side, got {len(feats_a)} and {len(feats_b)}")
    mu_a, mu_b = feats_a.mean(0), feats_b.mean(0)
    s_a, s_b = np.cov(feats_a, rowvar=False), np.cov(feats_b, rowvar=False)
    offset = eps * np.eye(len(mu_a))  # keeps sqrtm finite when covariances are singular (few samples)
    covmean = linalg.sqrtm((s_a + offset) @ (s_b + offset))
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * covmean))


def feature_frechet_distance(encoder: FeatureEncoder, real, synthetic) -> float:
    """Frechet distance between encoder features of real and synthetic images `(N, 1, H, W)`."""
    a = check_images(real, "real")
    b = check_images(synthetic, "synthetic")
    return frechet_distance(encoder.features(a), encoder.features(b))


def dice(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-item Dice of binary maps `(N, 1, H, W)`; 1 when both are empty."""
    inter = (pred * target).flatten(1).sum(1)
    total = pred.flatten(1).sum(1) + target.flatten(1).sum(1)
    return torch.where(total > 0, 2 * inter / total.clamp_min(1e-8), torch.ones_like(total))


def mask_consistency(segmenter: Segmenter, support_images, support_masks, synthetic_images, synthetic_masks,
                     *, threshold: float = 0.5) -> dict:
    """Dice between the intended masks and what `segmenter` (given only the real supports) finds.

    Low values flag the most common failure of mask-guided generators: images that do not follow their mask.
    """
    s_img, s_mask = as_pairs((support_images, support_masks), "support")
    q_img, q_mask = as_pairs((synthetic_images, synthetic_masks), "synthetic")
    pred = torch.as_tensor(segmenter(s_img, s_mask, q_img)).float()
    if pred.shape != q_mask.shape:
        raise PairError(f"segmenter returned {tuple(pred.shape)}, expected {tuple(q_mask.shape)}")
    scores = dice((pred > threshold).float(), q_mask)
    return {"mean_dice": float(scores.mean()), "per_pair": [round(float(s), 4) for s in scores]}


def intensity_histogram_distance(real, synthetic, *, bins: int = 64, value_range: tuple[float, float] = (-2.0, 5.0),
                                 real_masks=None, synthetic_masks=None) -> float:
    """Total-variation distance (0 same, 1 disjoint) between intensity histograms, inside masks if given."""
    a = check_images(real, "real")
    b = check_images(synthetic, "synthetic")
    a = a[real_masks > 0.5] if real_masks is not None else a.flatten()
    b = b[synthetic_masks > 0.5] if synthetic_masks is not None else b.flatten()
    if a.numel() == 0 or b.numel() == 0:
        raise PairError("no pixels to compare: the masks select nothing")
    lo, hi = value_range
    h_a = torch.histc(a.clamp(lo, hi), bins=bins, min=lo, max=hi)
    h_b = torch.histc(b.clamp(lo, hi), bins=bins, min=lo, max=hi)
    return float(0.5 * (h_a / h_a.sum() - h_b / h_b.sum()).abs().sum())


def nearest_neighbour_distance(training, synthetic) -> dict:
    """RMS pixel distance from each synthetic image to its nearest training image (memorisation check)."""
    a = check_images(training, "training").flatten(1)
    b = check_images(synthetic, "synthetic").flatten(1)
    d = torch.cdist(b, a).min(1).values / a.shape[1] ** 0.5  # (N_synthetic,)
    return {"mean": float(d.mean()), "min": float(d.min())}
