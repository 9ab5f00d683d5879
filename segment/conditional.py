"""Conditional network ("squeeze & excite" guided few-shot segmentation, Roy et al., MedIA 2020).

Two U-shaped arms. The conditioner reads a support image and its mask (2 channels) and, at every block,
emits excitation weights: per channel (Hu et al. 2018, cSE) and per pixel (Roy et al. 2018, sSE). The
segmenter reads the query and multiplies each of its block outputs by the matching weights, so the
support steers which structure the segmenter keeps. With k supports the conditioner outputs are
averaged. Trained episodically from scratch, like the original.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment.encoder import NORMS, conv_norm_act
from segment.pooling import ChannelGate, SpatialGate, check_episode


@dataclass(frozen=True)
class ConditionalConfig:
    """Architecture of the conditional network; saved with its weights."""

    resolution: int = 128
    width: int = 16  # segmenter channels at full resolution (doubling per level)
    cond_width: int = 8  # conditioner channels at full resolution (Roy et al. keep this arm light)
    levels: int = 3  # poolings after the stem; the bottleneck sits at resolution / (stem_stride * 2**levels)
    stem_stride: int = 2  # 2: both arms start at half resolution and logits are upsampled (CPU budget)
    norm: str = "instance"
    channel_gates: bool = True
    spatial_gates: bool = True

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"ConditionalConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"ConditionalConfig.stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.resolution % (self.stem_stride * 2 ** self.levels):
            raise ValueError(f"ConditionalConfig.resolution {self.resolution} must be divisible by "
                             f"stem_stride * 2**levels = {self.stem_stride * 2 ** self.levels}")
        if not (self.channel_gates or self.spatial_gates):
            raise ValueError("ConditionalConfig needs channel_gates or spatial_gates: without either the "
                             "support cannot steer the segmenter")


def _double_conv(cin: int, cout: int, norm: str) -> nn.Sequential:
    return nn.Sequential(conv_norm_act(cin, cout, norm=norm), conv_norm_act(cout, cout, norm=norm))


class UArm(nn.Module):
    """A small U-Net whose block outputs can be modulated: encoder blocks, bottleneck, decoder blocks."""

    def __init__(self, *, in_channels: int, width: int, levels: int, norm: str) -> None:
        super().__init__()
        widths = [width * 2 ** i for i in range(levels + 1)]
        self.widths = widths[:-1] + [widths[-1]] + widths[-2::-1]  # channels of each of the 2L+1 blocks
        self.down = nn.ModuleList([_double_conv(in_channels if i == 0 else widths[i - 1], widths[i], norm)
                                   for i in range(levels)])
        self.bottom = _double_conv(widths[levels - 1], widths[levels], norm)
        self.up = nn.ModuleList([_double_conv(widths[i + 1] + widths[i], widths[i], norm)
                                 for i in reversed(range(levels))])

    def forward(self, x: torch.Tensor, gates=None) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Returns the last block output and every block output; `gates(j, h)` modulates block j."""
        outputs, skips = [], []
        gate = gates or (lambda j, h: h)
        for block in self.down:
            x = gate(len(outputs), block(x))
            outputs.append(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        x = gate(len(outputs), self.bottom(x))
        outputs.append(x)
        for block, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = gate(len(outputs), block(torch.cat([x, skip], dim=1)))
            outputs.append(x)
        return x, outputs


class ConditionalNet(nn.Module):
    """Batched episodes in, two-class logits out (same interface as `PrototypeNet`).

    forward(support_images (B, S, 1, H, W), support_masks (B, S, 1, H, W), query_images (B, Q, 1, H, W))
    -> (logits (B, Q, 2, H, W), zero auxiliary loss).
    """

    def __init__(self, *, config: ConditionalConfig) -> None:
        super().__init__()
        self.config = config
        stride = config.stem_stride
        self.cond_stem = conv_norm_act(2, config.cond_width, norm=config.norm, stride=stride)
        self.seg_stem = conv_norm_act(1, config.width, norm=config.norm, stride=stride)
        self.conditioner = UArm(in_channels=config.cond_width, width=config.cond_width, levels=config.levels,
                                norm=config.norm)
        self.segmenter = UArm(in_channels=config.width, width=config.width, levels=config.levels, norm=config.norm)
        pairs = list(zip(self.conditioner.widths, self.segmenter.widths))
        self.channel_gates = nn.ModuleList([ChannelGate(in_channels=c, out_channels=s) for c, s in pairs]
                                           if config.channel_gates else [])
        self.spatial_gates = nn.ModuleList([SpatialGate(in_channels=c) for c, _ in pairs]
                                           if config.spatial_gates else [])
        self.classifier = nn.Conv2d(config.width, 2, kernel_size=1)

    def condition(self, support_images: torch.Tensor, support_masks: torch.Tensor) -> list[tuple]:
        """Excitation weights per block, averaged over the S supports of each of the B episodes."""
        b, s = support_images.shape[:2]
        # 1. conditioner on image + mask: block outputs (B * S, C_j, h_j, w_j)
        x = torch.cat([support_images, support_masks], dim=2).flatten(0, 1)  # (B * S, 2, H, W)
        _, blocks = self.conditioner(self.cond_stem(x))
        weights = []
        for j, feats in enumerate(blocks):
            # 2. squeeze-excite weights, mean over the k supports: (B, C_j, 1, 1) and (B, 1, h_j, w_j)
            ch = self.channel_gates[j](feats).unflatten(0, (b, s)).mean(1) if self.channel_gates else None
            sp = self.spatial_gates[j](feats).unflatten(0, (b, s)).mean(1) if self.spatial_gates else None
            weights.append((ch, sp))
        return weights

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, q = query_images.shape[:2]
        weights = self.condition(support_images, support_masks)

        def excite(j: int, h: torch.Tensor) -> torch.Tensor:
            # 3. modulate segmenter block j of every query by its episode's weights: (B * Q, C_j, h_j, w_j)
            ch, sp = weights[j]
            if ch is not None:
                h = h * ch.repeat_interleave(q, dim=0)
            if sp is not None:
                h = h * sp.repeat_interleave(q, dim=0)
            return h

        # 4. segment the queries under the excitation: (B * Q, width, H / stem, W / stem)
        out, _ = self.segmenter(self.seg_stem(query_images.flatten(0, 1)), excite)
        # 5. classify and upsample to the input size: (B, Q, 2, H, W)
        logits = F.interpolate(self.classifier(out), size=query_images.shape[-2:], mode="bilinear",
                               align_corners=False).unflatten(0, (b, q))
        return logits, logits.new_zeros(())

    @torch.no_grad()
    def segment(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> torch.Tensor:
        """One episode: supports `(S, 1, H, W)`, queries `(Q, 1, H, W)` -> foreground probability `(Q, 1, H, W)`."""
        check_episode(support_images, support_masks, query_images, resolution=self.config.resolution)
        logits, _ = self(support_images[None], support_masks[None], query_images[None])
        return F.softmax(logits[0], dim=1)[:, 1:]
