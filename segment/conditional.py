"""Conditional network ("squeeze & excite" guided few-shot segmentation, Roy et al., MedIA 2020).

Two U-shaped arms. The conditioner reads a support image and its mask (2 channels) and, at every block,
emits excitation weights: per channel (Hu et al. 2018, cSE) and per pixel (Roy et al. 2018, sSE). The
segmenter reads the query and multiplies each of its block outputs by the matching weights, so the
support steers which structure the segmenter keeps. With k supports the conditioner outputs are
averaged. Trained episodically from scratch, like the original.

Similarity gates (`similarity_gates`, the default): the per-pixel sSE weights come from the support's
position, so they only transfer when support and query are aligned; self-supervised episodes (two
views of one slice) make that a shortcut, and on another subject it misplaces the structure. With
similarity gates the segmenter arm also reads the supports, and at every block each pixel is weighted
by sigmoid(a_j (cos(f, p_fg) - cos(f, p_bg)) + b_j), with p_fg / p_bg the masked averages (PANet eq. 1)
of the supports' block features: the gate follows what the structure looks like, wherever it is.

Similarity head (`similarity_head`): trained from scratch on superpixel episodes with background
weights 1/3 and 1, the net marked the foreground by silencing its last features (feature norm 0.2-0.4
inside the organ, 3-4 outside), so no pixel's foreground probability rose above sigmoid(b_fg - b_bg) of
the classifier's biases (0.46-0.49 on CHAOS, Dice 0; issue 13). The background weight then decides alone
whether that ceiling lies above 0.5 (all that is silent is foreground: the over-segmentation seen at
weight 0.1) or below (nothing is). The head adds s * (cos(f, p_fg) - cos(f, p_bg)) of the last block to the
foreground logit, the prototype net's signed score (PANet eq. 3): a pixel becomes foreground because it
resembles the supports' structure.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment.encoder import NORMS, conv_norm_act
from segment.pooling import ChannelGate, SpatialGate, check_episode, resize_masks


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
    spatial_gates: bool = False  # positional sSE from the conditioner (Roy et al.); off: a shortcut (docstring)
    similarity_gates: bool = True  # support-query feature similarity at every block (module docstring)
    similarity_head: bool = True  # add the last block's fg-minus-bg cosine to the foreground logit (docstring)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"ConditionalConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.stem_stride not in (1, 2):
            raise ValueError(f"ConditionalConfig.stem_stride must be 1 or 2, got {self.stem_stride}")
        if self.resolution % (self.stem_stride * 2 ** self.levels):
            raise ValueError(f"ConditionalConfig.resolution {self.resolution} must be divisible by "
                             f"stem_stride * 2**levels = {self.stem_stride * 2 ** self.levels}")
        if not (self.channel_gates or self.spatial_gates or self.similarity_gates):
            raise ValueError("ConditionalConfig needs channel_gates, spatial_gates or similarity_gates: without "
                             "any the support cannot steer the segmenter")
        if self.similarity_head and not self.similarity_gates:
            raise ValueError("ConditionalConfig.similarity_head needs similarity_gates: the head scores the "
                             "supports' features, which the segmenter arm reads only with similarity gates; "
                             "set similarity_head = false with similarity_gates = false")


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
        n_blocks = len(self.segmenter.widths)
        # similarity gate j: sigmoid(a_j * (cos_fg - cos_bg) + b_j), starting near 0.9 so features pass
        self.similarity_scale = nn.Parameter(torch.full((n_blocks,), 5.0)) if config.similarity_gates else None
        self.similarity_bias = nn.Parameter(torch.full((n_blocks,), 2.0)) if config.similarity_gates else None
        self.classifier = nn.Conv2d(config.width, 2, kernel_size=1)
        # similarity head: foreground logit + s * (cos_fg - cos_bg) of the last block (PANet eq. 3, scaled)
        self.head_scale = nn.Parameter(torch.tensor(10.0)) if config.similarity_head else None

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

    def similarity_gate(self, j: int, h: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """Gate `(B, S + Q, 1, h, w)` of block j's features `h` `(B, S + Q, C, h, w)`, whose first S rows are
        the supports with `masks` `(B, S, 1, H, W)`: how much more each pixel resembles the supports'
        foreground than their background."""
        return torch.sigmoid(self.similarity_scale[j] * self.similarity(h, masks) + self.similarity_bias[j])[:, :, None]

    @staticmethod
    def similarity(h: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """cos(f, p_fg) - cos(f, p_bg) `(B, S + Q, h, w)` of features `h` `(B, S + Q, C, h, w)` whose first S rows
        are the supports with `masks` `(B, S, 1, H, W)`."""
        b, s = masks.shape[:2]
        m = resize_masks(masks.flatten(0, 1), h.shape[-2:]).unflatten(0, (b, s))  # (B, S, 1, h, w)
        sup = h[:, :s]
        fg = (sup * m).sum(dim=(1, 3, 4)) / m.sum(dim=(1, 3, 4)).clamp_min(1e-5)  # PANet eq. 1: (B, C)
        bg = (sup * (1 - m)).sum(dim=(1, 3, 4)) / (1 - m).sum(dim=(1, 3, 4)).clamp_min(1e-5)
        cos_fg = F.cosine_similarity(h, fg[:, None, :, None, None], dim=2)  # (B, S + Q, h, w)
        cos_bg = F.cosine_similarity(h, bg[:, None, :, None, None], dim=2)
        return cos_fg - cos_bg

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, q = query_images.shape[:2]
        s = support_images.shape[1] if self.config.similarity_gates else 0
        weights = self.condition(support_images, support_masks)
        # the segmenter arm reads the supports too when similarity gates need their features
        images = torch.cat([support_images[:, :s], query_images], dim=1)  # (B, S' + Q, 1, H, W), S' = S or 0

        def excite(j: int, h: torch.Tensor) -> torch.Tensor:
            # 3. modulate segmenter block j of every image of an episode by its weights: (B * (S' + Q), C_j, h_j, w_j)
            h = h.unflatten(0, (b, s + q))  # (B, S' + Q, C_j, h_j, w_j)
            ch, sp = weights[j]
            if ch is not None:
                h = h * ch[:, None]
            if sp is not None:
                h = h * sp[:, None]
            if s:
                h = h * self.similarity_gate(j, h, support_masks)
            return h.flatten(0, 1)

        # 4. segment under the excitation: (B * (S' + Q), width, H / stem, W / stem), then keep the queries
        out, _ = self.segmenter(self.seg_stem(images.flatten(0, 1)), excite)
        out = out.unflatten(0, (b, s + q))  # (B, S' + Q, width, H / stem, W / stem)
        # 5. classify: (B * Q, 2, H / stem, W / stem); the similarity head adds signed evidence for the foreground,
        # so a pixel is foreground because it resembles the support's structure, not by default
        logits = self.classifier(out[:, s:].flatten(0, 1))
        if self.head_scale is not None:
            score = self.head_scale * self.similarity(out, support_masks)[:, s:].flatten(0, 1)  # (B * Q, h, w)
            logits = logits + torch.stack([torch.zeros_like(score), score], dim=1)
        # 6. upsample to the input size: (B, Q, 2, H, W)
        logits = F.interpolate(logits, size=query_images.shape[-2:], mode="bilinear",
                               align_corners=False).unflatten(0, (b, q))
        return logits, logits.new_zeros(())

    @torch.no_grad()
    def segment(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> torch.Tensor:
        """One episode: supports `(S, 1, H, W)`, queries `(Q, 1, H, W)` -> foreground probability `(Q, 1, H, W)`."""
        check_episode(support_images, support_masks, query_images, resolution=self.config.resolution)
        logits, _ = self(support_images[None], support_masks[None], query_images[None])
        return F.softmax(logits[0], dim=1)[:, 1:]
