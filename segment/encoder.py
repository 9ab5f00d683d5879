"""A small residual CNN encoder in plain torch, trained from scratch (no weights can be downloaded here).

Layout: a stride-2 stem (full-resolution convolutions cost most and add little at 128 px on 2 CPU
cores), `depth - 1` further stride-2 residual stages that double the width, then
`dilated_blocks` residual blocks at the last resolution with growing dilation (as DeepLab keeps
resolution while widening the receptive field), then a 1x1 projection to `embed_dim` with no
activation so cosine similarities can be negative. Instance or group normalisation suits per-volume
MRI intensities and batches of one episode. Runs at any input size divisible by 2**depth (128, 256, ...).
With `fuse_stem` the embedding is upsampled once and fused (1x1 convolution, FPN-style lateral link, Lin
et al. 2017) with the stem's stride-2 features: the output stride halves, so prototypes are scored on a
grid twice as fine and small structures keep their boundaries, for about a fifth more compute.
With `coords` two channels of pixel coordinates in [-1, 1] join the image (CoordConv, Liu et al. 2018), so
features can say where in the image they lie: a structure and a look-alike elsewhere in the slice then
differ. Training augmentation shifts the content against these channels, which teaches how far to trust
them.
"""

from __future__ import annotations

import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

NORMS = ("instance", "group", "batch")


@dataclass(frozen=True)
class EncoderConfig:
    """Everything that decides the encoder's architecture; saved with its weights."""

    in_channels: int = 1
    width: int = 16  # channels of the stem; stage i has width * 2**i
    depth: int = 2  # stride-2 steps including the stem: output stride 2**depth
    dilated_blocks: int = 2  # extra blocks at the last resolution, dilation 2, 4, 8, ...
    embed_dim: int = 64
    norm: str = "instance"
    fuse_stem: bool = False  # fuse the stem's features: output stride 2**(depth - 1) instead of 2**depth
    coords: bool = False  # append (y, x) coordinate channels in [-1, 1] to the input (CoordConv)

    def __post_init__(self) -> None:
        if self.norm not in NORMS:
            raise ValueError(f"EncoderConfig.norm must be one of {NORMS}, got {self.norm!r}")
        if self.fuse_stem and self.depth < 2:
            raise ValueError(f"EncoderConfig.fuse_stem needs depth >= 2 (the stem is already at the output "
                             f"stride), got depth {self.depth}")
        for name in ("in_channels", "width", "depth", "embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"EncoderConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.dilated_blocks < 0:
            raise ValueError(f"EncoderConfig.dilated_blocks must be >= 0, got {self.dilated_blocks}")

    @property
    def stride(self) -> int:
        """Output stride: input size / feature size."""
        return 2 ** (self.depth - 1) if self.fuse_stem else 2 ** self.depth

    @property
    def input_multiple(self) -> int:
        """The input size must be a multiple of this (every stride-2 step halves it exactly)."""
        return 2 ** self.depth


def make_norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "group":
        return nn.GroupNorm(min(8, channels), channels)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def conv_norm_act(cin: int, cout: int, *, norm: str, stride: int = 1, dilation: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False),
                         make_norm(norm, cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3x3 convolutions with a shortcut (He et al. 2016); the shortcut projects when shapes change."""

    def __init__(self, cin: int, cout: int, *, norm: str, stride: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.conv1 = conv_norm_act(cin, cout, norm=norm, stride=stride, dilation=dilation)
        self.conv2 = nn.Sequential(nn.Conv2d(cout, cout, 3, padding=dilation, dilation=dilation, bias=False),
                                   make_norm(norm, cout))
        self.shortcut = nn.Identity() if (cin == cout and stride == 1) else nn.Sequential(
            nn.Conv2d(cin, cout, 1, stride=stride, bias=False), make_norm(norm, cout))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv2(self.conv1(x)) + self.shortcut(x))


class Encoder(nn.Module):
    """Image `(N, in_channels, H, W)` -> features `(N, embed_dim, H / stride, W / stride)` (`config.stride`)."""

    def __init__(self, *, config: EncoderConfig) -> None:
        super().__init__()
        self.config = config
        c = config.width
        self.stem = conv_norm_act(config.in_channels + (2 if config.coords else 0), c, norm=config.norm, stride=2)
        self.stages = nn.ModuleList()
        for i in range(config.depth - 1):
            self.stages.append(ResidualBlock(c * 2 ** i, c * 2 ** (i + 1), norm=config.norm, stride=2))
        top = c * 2 ** (config.depth - 1)
        self.dilated = nn.Sequential(*[ResidualBlock(top, top, norm=config.norm, dilation=2 ** (j + 1))
                                       for j in range(config.dilated_blocks)])
        self.head = None if config.fuse_stem else nn.Conv2d(top, config.embed_dim, kernel_size=1)
        # FPN-style lateral link: [upsampled top features, stem features] -> embedding at stride 2**(depth - 1)
        self.fuse = nn.Conv2d(top + c, config.embed_dim, kernel_size=1) if config.fuse_stem else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        stride = self.config.input_multiple
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"Encoder input must have shape (N, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-1] % stride or x.shape[-2] % stride:
            raise ValueError(f"Encoder input size {tuple(x.shape[-2:])} must be divisible by its stride {stride}")
        if self.config.coords:
            # 0. CoordConv: (N, in_channels + 2, H, W), coordinates of pixel centres in [-1, 1]
            ys = torch.linspace(-1, 1, x.shape[-2], device=x.device, dtype=x.dtype)
            xs = torch.linspace(-1, 1, x.shape[-1], device=x.device, dtype=x.dtype)
            grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
            x = torch.cat([x, grid.expand(x.shape[0], -1, -1, -1)], dim=1)
        # 1. stride-2 stem: (N, width, H / 2, W / 2)
        stem = h = self.stem(x)
        # 2. strided stages: (N, width * 2**(depth - 1), H / 2**depth, W / 2**depth)
        for stage in self.stages:
            h = stage(h)
        # 3. dilated blocks widen the receptive field at the same resolution
        h = self.dilated(h)
        if self.head is not None:
            # 4. linear projection to the embedding: (N, embed_dim, H / 2**depth, W / 2**depth)
            return self.head(h)
        # 4'. upsample to the stem's grid and fuse linearly: (N, embed_dim, H / 2**(depth - 1), W / 2**(depth - 1))
        for _ in range(self.config.depth - 2):  # stems at stride 2; stages between add strides of 2
            stem = F.avg_pool2d(stem, 2)
        up = F.interpolate(h, size=stem.shape[-2:], mode="bilinear", align_corners=False)
        return self.fuse(torch.cat([up, stem], dim=1))


class CheckpointError(ValueError):
    """A checkpoint is damaged, of the wrong structure, or not safe to read (it would run code)."""


def load_tensors(path: Path, what: str) -> object:
    """`torch.load(path, weights_only=True)`: tensors, numbers, strings and containers only.

    A file that is damaged, or a pickle that would run code, raises `CheckpointError` naming `what` and the
    file; nothing in it is run.
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"{what} {path} cannot be read as tensors only (weights_only=True): "
                              f"{_unpickling_reason(err)}; it is damaged or not a SupportForge checkpoint, and it "
                              f"was not run: delete it and retrain") from None


def _unpickling_reason(err: Exception) -> str:
    """The useful line of a `torch.load` error (the refused global or opcode), not its advice to turn
    `weights_only` off."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for k, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip() or "".join(lines[k + 1:k + 2])
            return rest.split(". ")[0].rstrip(".") or type(err).__name__  # first sentence: what was refused
    return lines[0] if lines else type(err).__name__


def load_encoder_weights(encoder: Encoder, path: str | Path) -> None:
    """Load a local checkpoint into `encoder`: a bare state dict, or a dict holding one under "encoder".

    The file's architecture must match: a mismatch names the file and the keys that differ.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"encoder checkpoint {path} does not exist")
    state = load_tensors(path, "encoder checkpoint")
    if isinstance(state, dict) and "encoder" in state:
        state = state["encoder"]
    if not isinstance(state, dict):
        raise ValueError(f"encoder checkpoint {path} holds {type(state).__name__}, expected a state dict")
    try:
        missing, unexpected = encoder.load_state_dict(state, strict=False)
    except RuntimeError as err:  # tensor shapes differ
        raise ValueError(f"encoder checkpoint {path} does not fit EncoderConfig {asdict(encoder.config)}: "
                         f"{str(err).splitlines()[-1].strip()}") from None
    if missing or unexpected:
        raise ValueError(f"encoder checkpoint {path} does not fit EncoderConfig {asdict(encoder.config)}: "
                         f"missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
