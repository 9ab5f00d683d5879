"""The configs of the generators and of mask deformation: frozen dataclasses that each checkpoint carries and that rebuild its model.

They live apart from the models so that reading or validating an experiment config needs neither torch
nor diffusers.
"""
from __future__ import annotations

from dataclasses import dataclass

SAMPLERS = ("ddim", "dpmsolver++")
PREDICTIONS = ("epsilon", "v_prediction")
PRECISIONS = ("no", "bf16", "fp16")
FINETUNE_ON = ("supports", "learned")  # the class's real supports alone, or with the learned source's pairs added


def _check_finetune_on(owner: str, finetune_on: str, finetune_pairs: int) -> None:
    """What the per-class fine-tune learns from: a known source, and at least one of its pairs."""
    if finetune_on not in FINETUNE_ON:
        raise ValueError(f"{owner}.finetune_on={finetune_on!r}; valid: {list(FINETUNE_ON)}")
    if finetune_pairs < 1:
        raise ValueError(f"{owner}.finetune_pairs must be >= 1 (pairs of finetune_on added to the supports), "
                         f"got {finetune_pairs}")


def _check_steps(owner: str, pretrain_steps: int, finetune_steps: int) -> None:
    """Step counts are >= 0 (0 skips the phase); a negative count would silently train nothing."""
    for name, value in (("pretrain_steps", pretrain_steps), ("finetune_steps", finetune_steps)):
        if value < 0:
            raise ValueError(f"{owner}.{name} must be >= 0, got {value}")


# Histogram appearance (augment.appearance): match organ to organ and the rest to the rest ("structure"), or
# the whole slice at once ("slice", which needs no donor organ region).
APPEARANCE_REGIONS = ("structure", "slice")


@dataclass(frozen=True)
class DDPMConfig:
    """Everything that defines a DDPM generator; saved in its checkpoint so the file rebuilds the model."""
    resolution: int = 128
    block_channels: tuple[int, ...] = (16, 32, 64, 128)
    layers_per_block: int = 1
    attention: bool = False            # self-attention in the lowest-resolution blocks
    norm_groups: int = 8
    joint: bool = False                # denoise image and mask together instead of conditioning on the mask
    prediction_type: str = "epsilon"
    train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    x0_clip: float = 6.0               # samplers clamp predicted x0 to +-x0_clip (z-scored MRI stays within ~5)
    lr: float = 2e-4
    finetune_lr: float = 1e-4
    weight_decay: float = 1e-2
    batch_size: int = 16
    pretrain_steps: int = 1000
    finetune_steps: int = 200
    finetune_on: str = "supports"      # "learned": fine-tune on the learned source's pairs plus the supports
    finetune_pairs: int = 64           # how many of those pairs (finetune_on = "learned" only)
    ema_max_decay: float = 0.999
    sampler: str = "dpmsolver++"
    sample_steps: int = 10
    sample_batch: int = 16
    seed: int = 0
    cpu: bool = True
    mixed_precision: str = "no"

    def __post_init__(self):
        checks = [("prediction_type", self.prediction_type, PREDICTIONS), ("sampler", self.sampler, SAMPLERS),
                  ("mixed_precision", self.mixed_precision, PRECISIONS)]
        for name, value, valid in checks:
            if value not in valid:
                raise ValueError(f"DDPMConfig.{name}={value!r}; valid: {list(valid)}")
        if self.resolution % 2 ** (len(self.block_channels) - 1):
            raise ValueError(f"DDPMConfig.resolution={self.resolution} must be divisible by "
                             f"2**{len(self.block_channels) - 1} for block_channels={self.block_channels}")
        if any(c % self.norm_groups for c in self.block_channels):
            raise ValueError(f"DDPMConfig.block_channels={self.block_channels} must be multiples of "
                             f"norm_groups={self.norm_groups}")
        for name in ("batch_size", "sample_steps", "sample_batch", "train_timesteps"):
            if getattr(self, name) < 1:
                raise ValueError(f"DDPMConfig.{name} must be >= 1, got {getattr(self, name)}")
        _check_steps("DDPMConfig", self.pretrain_steps, self.finetune_steps)
        _check_finetune_on("DDPMConfig", self.finetune_on, self.finetune_pairs)


@dataclass(frozen=True)
class GANConfig:
    """Everything that defines a GAN generator; saved in its checkpoint so the file rebuilds the model."""
    resolution: int = 128
    z_dim: int = 64
    gen_channels: int = 64          # channels at the coarsest map; halved (down to 16) at each upsampling
    n_up: int = 4                   # coarsest map is resolution / 2**n_up
    disc_channels: int = 32
    disc_layers: int = 3
    disc_scales: int = 2
    fm_weight: float = 10.0
    lr_g: float = 2e-4
    lr_d: float = 2e-4
    finetune_lr_scale: float = 0.5
    batch_size: int = 16
    pretrain_steps: int = 1000
    finetune_steps: int = 200
    finetune_on: str = "supports"   # "learned": fine-tune on the learned source's pairs plus the supports
    finetune_pairs: int = 64        # how many of those pairs (finetune_on = "learned" only)
    seed: int = 0
    cpu: bool = True
    mixed_precision: str = "no"

    def __post_init__(self):
        if self.resolution % 2 ** self.n_up:
            raise ValueError(f"GANConfig.resolution={self.resolution} must be divisible by 2**n_up={2 ** self.n_up}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise ValueError(f"GANConfig.mixed_precision={self.mixed_precision!r}; valid: ['no', 'bf16', 'fp16']")
        if self.disc_scales < 1 or self.disc_layers < 1 or self.batch_size < 1:
            raise ValueError(f"GANConfig: disc_scales, disc_layers and batch_size must be >= 1, got "
                             f"{self.disc_scales}, {self.disc_layers}, {self.batch_size}")
        _check_steps("GANConfig", self.pretrain_steps, self.finetune_steps)
        _check_finetune_on("GANConfig", self.finetune_on, self.finetune_pairs)


@dataclass(frozen=True)
class DeformConfig:
    """Deformation strengths (pixels are given for 128 x 128 and scaled with the resolution) and checks."""
    rotate_deg: float = 12.0
    scale: tuple[float, float] = (0.85, 1.15)
    translate_frac: float = 0.05
    elastic_alpha: float = 40.0
    elastic_sigma: float = 6.0
    grid_distort: float = 0.15
    min_area_ratio: float = 0.5
    max_area_ratio: float = 1.8
    min_fragment_px: int = 12
    drop_fragment_px: int = 4         # source fragments under this many pixels are dropped before deforming
    max_tries: int = 30

    def __post_init__(self):
        if not 0 < self.min_area_ratio <= 1 <= self.max_area_ratio:
            raise ValueError(f"DeformConfig needs 0 < min_area_ratio <= 1 <= max_area_ratio, got "
                             f"{self.min_area_ratio}, {self.max_area_ratio}")
        if self.max_tries < 1:
            raise ValueError(f"DeformConfig.max_tries must be >= 1, got {self.max_tries}")
        if self.drop_fragment_px < 0:
            raise ValueError(f"DeformConfig.drop_fragment_px must be >= 0 (0 keeps every fragment), "
                             f"got {self.drop_fragment_px}")


@dataclass(frozen=True)
class LearnedConfig:
    """The learned-transform source (`augment.learned`): a registration model trained per fold on the images
    of the fold's training volumes, and the label-free checks every warped pair passes before use.

    The first block defines the model (`augment.registration.RegistrationConfig`); the second is read only
    when pairs are made (`pair_fields` of the registry), so changing a threshold never retrains the model.
    Defaults are those chosen on the training volumes' label accuracy and the phantom, never on test Dice,
    except `appearance`, turned off after a diagnostic run on the CHAOS folds (see its comment).
    """
    resolution: int = 128
    channels: tuple[int, ...] = (16, 32, 32, 32)
    final_channels: tuple[int, ...] = (16,)
    integration_steps: int = 7
    steps: int = 400
    bending_weight: float = 0.1
    batch_size: int = 8
    lr: float = 1e-3
    pool_size: int = 256
    candidates: int = 3
    # read only when making pairs
    z_window: int = 1                  # slices searched around the volume-level slice correspondence
    max_folded_share: float = 0.005    # share of pixels with Jacobian determinant <= 0
    min_similarity: float = 0.15       # mean squared LNCC with the target slice
    min_area_ratio: float = 0.5        # warped mask area over the support mask's
    max_area_ratio: float = 2.0
    min_fragment_px: int = 12
    # histogram-match each warped support to another subject's slice. Off by default: on CHAOS (5 folds, seed 0)
    # it took the learned arm from 71.2 to 69.5 EP1 (real-only 71.3) and the mask consistency of the pairs from
    # 66-73 % to 56-58 %, because its donor organ region is the warped mask, right only about half the time
    appearance: bool = False
    appearance_regions: str = "structure"  # one of APPEARANCE_REGIONS
    seed: int = 0
    cpu: bool = True

    def __post_init__(self):
        if len(self.channels) < 2 or len(self.channels) % 2:
            raise ValueError(f"LearnedConfig.channels={self.channels} must be an even number of widths")
        if self.resolution % 2 ** (len(self.channels) // 2):
            raise ValueError(f"LearnedConfig.resolution={self.resolution} must be divisible by "
                             f"2**{len(self.channels) // 2} for channels={self.channels}")
        for name in ("steps", "batch_size", "pool_size", "candidates"):
            if getattr(self, name) < 1:
                raise ValueError(f"LearnedConfig.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("integration_steps", "z_window", "min_fragment_px"):
            if getattr(self, name) < 0:
                raise ValueError(f"LearnedConfig.{name} must be >= 0, got {getattr(self, name)}")
        if self.appearance_regions not in APPEARANCE_REGIONS:
            raise ValueError(f"LearnedConfig.appearance_regions={self.appearance_regions!r}; valid: "
                             f"{list(APPEARANCE_REGIONS)}")
        if self.bending_weight < 0:
            raise ValueError(f"LearnedConfig.bending_weight must be >= 0, got {self.bending_weight}")
        if not 0 <= self.max_folded_share <= 1 or not -1 <= self.min_similarity <= 1:
            raise ValueError(f"LearnedConfig needs max_folded_share in [0, 1] and min_similarity in [-1, 1], got "
                             f"{self.max_folded_share}, {self.min_similarity}")
        if not 0 < self.min_area_ratio <= 1 <= self.max_area_ratio:
            raise ValueError(f"LearnedConfig needs 0 < min_area_ratio <= 1 <= max_area_ratio, got "
                             f"{self.min_area_ratio}, {self.max_area_ratio}")


@dataclass(frozen=True)
class PropagatedConfig:
    """The propagated source (`augment.propagated`): unlabelled slices of the support volume at `offsets` from
    each support slice, with the support mask carried there by TV-L1 optical flow, slice by slice. It trains
    no model; every field but the runner's is read when pairs are made. The defaults were chosen on the label
    accuracy of the propagation on fold 0's training volumes (labels read for that measurement only,
    `benchmarks/augment_propagated.py`, results in benchmarks/results/augment_propagated.md), never on test Dice."""
    resolution: int = 128
    # every distance whose passing candidates are >= 85 % right on CHAOS fold 0's training volumes (91.3 / 89.1 /
    # 86.2 % at 1 / 2 / 3 slices, against 85.6 / 78.1 / 70.5 % for the support mask copied); nearest are used first
    offsets: tuple[int, ...] = (1, 2, 3)
    # share of folded pixels where the label lies. TV-L1 is not diffeomorphic: 1-3 % of them fold (median) and on
    # the training volumes folding did not predict label accuracy, so this bound drops only grossly folded flows
    max_folded_share: float = 0.1
    min_area_ratio: float = 0.5
    max_area_ratio: float = 2.0
    min_fragment_px: int = 12
    # whole-slice histogram matching of each pair to a slice of another training volume at the same relative
    # height (`augment.appearance`, regions "slice"): other subjects' contrast on the support volume's anatomy.
    # The oracle's slices bring both; propagated pairs carry the support's own intensities. Off by default
    appearance: bool = False
    seed: int = 0
    cpu: bool = True

    def __post_init__(self):
        if not self.offsets or min(self.offsets) < 1 or len(set(self.offsets)) != len(self.offsets):
            raise ValueError(f"PropagatedConfig.offsets={self.offsets} must be distinct slice distances >= 1")
        if not 0 <= self.max_folded_share <= 1 or not 0 < self.min_area_ratio <= 1 <= self.max_area_ratio:
            raise ValueError(f"PropagatedConfig needs max_folded_share in [0, 1] and 0 < min_area_ratio <= 1 <= "
                             f"max_area_ratio, got {self.max_folded_share}, {self.min_area_ratio}, "
                             f"{self.max_area_ratio}")


@dataclass(frozen=True)
class RegisteredConfig:
    """The registered source (`augment.registered`): real slices of the fold's unlabelled training volumes, each
    with a support mask carried there by the learned source's registration model (which [generators.learned]
    defines; it is trained once and shared). The pipeline then relabels each pair with the segmenter's own
    prediction (the baseline arm's model, given the real supports) and keeps a pair only where that prediction and
    the registered mask agree with Dice >= `min_agreement`, a label-free sign that both are right (on CHAOS the kept
    masks are 80 % right: the two estimates share some errors). Every field but the runner's is read when pairs
    are made."""
    resolution: int = 128
    # the label-free checks of each registered candidate, as the learned source's (`LearnedConfig`)
    z_window: int = 1
    max_folded_share: float = 0.005
    min_similarity: float = 0.15
    min_area_ratio: float = 0.5
    max_area_ratio: float = 2.0
    min_fragment_px: int = 12
    # chosen on the label accuracy of the kept pairs on CHAOS's training volumes (labels read for that measurement
    # only, benchmarks/augment_registered.py; results in benchmarks/results/augment_registered.md), never on test Dice
    min_agreement: float = 0.7
    seed: int = 0
    cpu: bool = True

    def __post_init__(self):
        if not 0 < self.min_agreement <= 1:
            raise ValueError(f"RegisteredConfig.min_agreement={self.min_agreement} must be in (0, 1]")
        if not 0 < self.min_area_ratio <= 1 <= self.max_area_ratio or self.z_window < 0:
            raise ValueError(f"RegisteredConfig needs 0 < min_area_ratio <= 1 <= max_area_ratio and z_window >= 0, "
                             f"got {self.min_area_ratio}, {self.max_area_ratio}, {self.z_window}")


@dataclass(frozen=True)
class OracleConfig:
    """The oracle source (`augment.oracle`, diagnostic only): real training slices with their TRUE labels at
    the EP1 relative positions. It has nothing to set; the runner sets these fields."""
    resolution: int = 128
    seed: int = 0
    cpu: bool = True


@dataclass(frozen=True)
class SDEditConfig:
    """The SDEdit source (`augment.sdedit`, Meng et al. 2022): the learned source's pairs, each image noised to
    `strength` of the diffusion trajectory and denoised by the class's fine-tuned DDPM, mask kept.

    strength 0 returns the warped images unchanged, 1 discards them (ordinary sampling for their masks). The
    sampler, its steps and batch come from [generators.ddpm]."""
    resolution: int = 128
    strength: float = 0.5
    seed: int = 0
    cpu: bool = True

    def __post_init__(self):
        if not 0.0 <= self.strength <= 1.0:
            raise ValueError(f"SDEditConfig.strength={self.strength}; it is the fraction of the diffusion "
                             f"trajectory, in [0, 1] (0 keeps the image, 1 samples from noise)")
