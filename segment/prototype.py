"""Prototype network (PANet / SSL-ALPNet family) for k-shot, 1-way segmentation.

Support features are pooled under the support mask into a foreground and a background prototype
(plus local prototypes on a grid where mask coverage is high: ALPNet's adaptive local prototypes);
every query pixel is scored by scaled cosine similarity to each class, and a softmax over
{background, foreground} decides. Any number of supports k >= 1 (real or synthetic) is pooled together.
Training adds PANet's prototype-alignment loss: the query prediction must segment the support back.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from segment.encoder import Encoder, EncoderConfig
from segment.pooling import check_episode, cosine_scores, local_prototypes, masked_average_pool, resize_masks


@dataclass(frozen=True)
class PrototypeConfig:
    """Architecture of the prototype network; saved with its weights."""

    encoder: EncoderConfig = field(default_factory=EncoderConfig)
    resolution: int = 128  # input size the network expects
    scale: float = 20.0  # cosine scale (PANet / ALPNet use 20)
    learn_scale: bool = False
    local_kernel: int = 4  # grid cell of the local prototypes, in feature pixels (ALPNet: 4 at 32x32)
    fg_threshold: float = 0.95  # mask coverage a cell needs to give a local prototype (ALPNet: 0.95)
    bg_threshold: float = 0.95
    align: bool = True  # compute the prototype-alignment loss in training

    def __post_init__(self) -> None:
        if isinstance(self.encoder, dict):  # rebuilt from a saved checkpoint
            object.__setattr__(self, "encoder", EncoderConfig(**self.encoder))
        if self.resolution % self.encoder.input_multiple:
            raise ValueError(f"PrototypeConfig.resolution {self.resolution} must be divisible by "
                             f"2**depth = {self.encoder.input_multiple}")
        if not 0.0 < self.fg_threshold <= 1.0 or not 0.0 < self.bg_threshold <= 1.0:
            raise ValueError(f"thresholds must lie in (0, 1], got fg {self.fg_threshold}, bg {self.bg_threshold}")


class PrototypeNet(nn.Module):
    """Batched episodes in, two-class logits out.

    forward(support_images (B, S, 1, H, W), support_masks (B, S, 1, H, W), query_images (B, Q, 1, H, W))
    -> (logits (B, Q, 2, H, W), alignment loss scalar). Use `segment` for one unbatched episode.
    """

    def __init__(self, *, config: PrototypeConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config=config.encoder)
        scale = torch.tensor(float(config.scale))
        if config.learn_scale:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)

    def class_scores(self, support_feats: torch.Tensor, support_masks: torch.Tensor,
                     query_feats: torch.Tensor) -> torch.Tensor:
        """Scores `(Q, 2, h, w)` of query features for background and foreground of one episode.

        support_feats `(S, C, h, w)`, support_masks `(S, 1, h, w)` soft (area-resized), query_feats `(Q, C, h, w)`.
        """
        cfg = self.config
        scores = []
        for masks, threshold, add_global in ((1.0 - support_masks, cfg.bg_threshold, False),
                                             (support_masks, cfg.fg_threshold, True)):
            # ALPNet: local prototypes where coverage > threshold; foreground keeps the global one too
            protos = local_prototypes(support_feats, masks, kernel=cfg.local_kernel, threshold=threshold)
            if add_global or protos.shape[0] == 0:
                protos = torch.cat([protos, masked_average_pool(support_feats, masks)[None]])  # (P, C)
            scores.append(cosine_scores(query_feats, protos, self.scale))  # (Q, h, w)
        return torch.stack(scores, dim=1)  # (Q, 2, h, w)

    def forward(self, support_images: torch.Tensor, support_masks: torch.Tensor,
                query_images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, s, _, h, w = support_images.shape
        q = query_images.shape[1]
        # 1. encode supports and queries in one pass: (B * (S + Q), C, h', w')
        images = torch.cat([support_images.flatten(0, 1), query_images.flatten(0, 1)])
        feats = self.encoder(images)
        size = feats.shape[-2:]
        sup_feats = feats[: b * s].unflatten(0, (b, s))  # (B, S, C, h', w')
        qry_feats = feats[b * s:].unflatten(0, (b, q))  # (B, Q, C, h', w')
        sup_masks = resize_masks(support_masks.flatten(0, 1), size).unflatten(0, (b, s))  # (B, S, 1, h', w')
        logits, align = [], feats.new_zeros(())
        for i in range(b):
            # 2. pool prototypes from the supports and 3. score the queries: (Q, 2, h', w')
            scores = self.class_scores(sup_feats[i], sup_masks[i], qry_feats[i])
            logits.append(scores)
            # 4. PANet eq. 6 (prototype alignment): the query prediction, used as a mask, segments the supports
            if self.training and self.config.align:
                pred = F.softmax(scores, dim=1)[:, 1:].detach()  # (Q, 1, h', w')
                if 0.0 < float(pred.round().mean()) < 1.0:
                    back = self.class_scores(qry_feats[i], pred.round(), sup_feats[i])  # (S, 2, h', w')
                    back = F.interpolate(back, size=(h, w), mode="bilinear", align_corners=False)
                    target = support_masks[i, :, 0].round().long()  # (S, H, W)
                    align = align + F.cross_entropy(back, target) / b
        # 5. upsample to the input size: (B, Q, 2, H, W)
        out = torch.stack(logits).flatten(0, 1)
        out = F.interpolate(out, size=(h, w), mode="bilinear", align_corners=False)
        return out.unflatten(0, (b, q)), align

    @torch.no_grad()
    def segment(self, support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor,
                *, self_support: int = 0) -> torch.Tensor:
        """One episode: supports `(S, 1, H, W)`, queries `(Q, 1, H, W)` -> foreground probability `(Q, 1, H, W)`.

        self_support: rounds of transductive refinement in the spirit of self-support prototypes (Fan et
        al., ECCV 2022): the queries' own thresholded prediction joins the supports as pseudo-labelled
        masks, so prototypes also come from the query slices, then the queries are scored again.
        """
        check_episode(support_images, support_masks, query_images, resolution=self.config.resolution)
        s = support_images.shape[0]
        h, w = query_images.shape[-2:]
        # 1. encode supports and queries: (S + Q, C, h', w')
        feats = self.encoder(torch.cat([support_images, query_images]))
        sup_feats, qry_feats = feats[:s], feats[s:]
        sup_masks = resize_masks(support_masks, feats.shape[-2:])  # (S, 1, h', w')
        # 2. pool prototypes and score the queries: (Q, 2, h', w')
        scores = self.class_scores(sup_feats, sup_masks, qry_feats)
        for _ in range(self_support):
            # 3. queries with a confident prediction become pseudo-labelled supports
            pred = (F.softmax(scores, dim=1)[:, 1:] > 0.5).float()  # (Q, 1, h', w')
            if not 0.0 < float(pred.mean()) < 1.0:
                break
            scores = self.class_scores(torch.cat([sup_feats, qry_feats]), torch.cat([sup_masks, pred]), qry_feats)
        # 4. probability at the input size: (Q, 1, H, W)
        probs = F.softmax(F.interpolate(scores, size=(h, w), mode="bilinear", align_corners=False), dim=1)
        return probs[:, 1:]
