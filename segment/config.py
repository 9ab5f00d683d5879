"""Configs of the segment stage: frozen dataclasses that checkpoints carry and experiment configs override.

They live apart from the models so that reading or validating an experiment config needs no torch.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

MODELS = ("prototype", "conditional")
SETTINGS = (1, 2)
PROTOCOLS = ("EP1", "EP2")
GRIDS = ("native", "working")  # where Dice is scored: the label files' grid or the working one
SCORE_ON = ("queries", "training")  # which volumes of a fold are scored: the verdict's, or a validation run's
# Working resolutions: multiples of 8 (the encoders halve the map up to 3 times) from 16 to 1024 px.
RESOLUTIONS = range(16, 1025, 8)


@dataclass(frozen=True)
class SegmenterConfig:
    """Model, episode mix and optimisation of one training run; saved in every checkpoint."""

    model: str = "prototype"  # "prototype" | "conditional"
    width: int = 16  # encoder / segmenter channels at the first level
    depth: int = 2  # prototype encoder: output stride 2**depth; conditional: U-Net levels + 1
    dilated_blocks: int = 2
    embed_dim: int = 64
    norm: str = "instance"
    fuse_stem: bool = False  # prototype encoder: fuse the stem's features, halving the output stride
    coords: bool = False  # prototype encoder: coordinate channels beside the image (CoordConv)
    resolution: int = 128
    steps: int = 3000  # prototype at 128 px: 3000 beat 1000 on all 5 CHAOS folds (issue 13); CPU configs set fewer
    lr: float = 1e-3
    warmup: int = 50
    weight_decay: float = 1e-4
    batch: int = 4  # episodes per step (per process)
    seed: int = 0
    n_supports: int = 1  # supports per training episode
    mix_superpixel: float = 1.0  # episode mix weights
    mix_supervised: float = 0.0
    mix_pairs: float = 0.5  # used only when extra pairs are given
    bg_weight: float = 0.1  # prototype model: cross-entropy weight of background (ALPNet)
    align_weight: float = 1.0  # PANet prototype-alignment loss (prototype model)
    # conditional model: cross-entropy weight of background and weight of a soft Dice term (`loss_weights`);
    # unweighted CE + Dice (Roy et al. 2020) with the similarity head: 5-fold EP1 68.3 (issue 13)
    conditional_bg_weight: float = 1.0
    conditional_dice_weight: float = 1.0
    augment: bool = True
    superpixel_scale: float = 100.0
    spatial_gates: bool = False  # conditional model: positional sSE from the support (Roy et al.)
    similarity_gates: bool = True  # conditional model: support-query similarity gate at every block
    similarity_head: bool = True  # conditional model: last block's support-query similarity in the foreground logit
    neighbour_span: int = 2  # superpixel episodes: query slice up to this many slices from the support (0: same)
    neighbour_min_iou: float = 0.3  # weaker cross-slice links fall back to the support's own slice
    checkpoint_every: int = 100
    cpu: bool = False  # force CPU (and gloo under torchrun)
    encoder_init: str = ""  # optional local encoder checkpoint to start from (prototype model)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"SegmenterConfig.model must be one of {MODELS}, got {self.model!r}")
        for name in ("width", "depth", "embed_dim", "resolution", "steps", "batch", "n_supports", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"SegmenterConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.neighbour_span < 0:
            raise ValueError(f"SegmenterConfig.neighbour_span must be >= 0, got {self.neighbour_span}")
        if not 0.0 <= self.neighbour_min_iou <= 1.0:
            raise ValueError(f"SegmenterConfig.neighbour_min_iou must lie in [0, 1], got {self.neighbour_min_iou}")
        if self.warmup < 0:
            raise ValueError(f"SegmenterConfig.warmup must be >= 0, got {self.warmup}")
        if self.lr <= 0:
            raise ValueError(f"SegmenterConfig.lr must be > 0, got {self.lr}")
        if self.similarity_head and not self.similarity_gates:  # checked for both models: one [segment] table
            raise ValueError("SegmenterConfig.similarity_head = true needs similarity_gates = true (the head scores "
                             "the supports' features); set similarity_head = false with similarity_gates = false")
        for name in ("bg_weight", "conditional_bg_weight"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SegmenterConfig.{name} must be > 0, got {getattr(self, name)}")
        if not self.conditional_dice_weight >= 0:
            raise ValueError(f"SegmenterConfig.conditional_dice_weight must be >= 0, got {self.conditional_dice_weight}")
        if min(self.mix_superpixel, self.mix_supervised, self.mix_pairs) < 0:
            raise ValueError("SegmenterConfig mix weights must be >= 0, got "
                             f"{(self.mix_superpixel, self.mix_supervised, self.mix_pairs)}")

    def loss_weights(self) -> tuple[float, float]:
        """(background cross-entropy weight, soft Dice weight) of this config's model.

        The prototype net keeps ALPNet's down-weighted background. The conditional net scores pixels
        with a free classifier, so a background weight w < 1 moves its 0.5 decision to a true
        foreground probability of w / (1 + w) (0.09 at 0.1): it over-segments. Its own pair of
        weights lets it train on unweighted cross-entropy plus soft Dice (Roy et al., MedIA 2020).
        """
        if self.model == "prototype":
            return self.bg_weight, 0.0
        return self.conditional_bg_weight, self.conditional_dice_weight

    @classmethod
    def from_dict(cls, raw: dict) -> SegmenterConfig:
        """Build from a dict (TOML table, checkpoint); an unknown key fails and lists the valid ones."""
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(raw) - set(valid))
        if unknown:
            raise ValueError(f"unknown segmenter config key(s) {unknown}; valid keys are {valid}")
        return cls(**raw)


@dataclass(frozen=True)
class SuperpixelParams:
    """skimage.segmentation.felzenszwalb arguments. min_size is in pixels at 256 px and scales with area."""

    scale: float = 100.0
    sigma: float = 0.8
    min_size_256: int = 400  # ALPNet's value at 256 x 256
    body_fraction: float = 0.5  # a segment with less of its area inside the body becomes 0

    def min_size(self, resolution: int) -> int:
        return max(4, round(self.min_size_256 * (resolution / 256) ** 2))
