"""SPADE-style mask-to-image GAN: noise in, the mask modulates every normalisation layer.

Generator: Park et al. 2019 (SPADE), a noise vector z projected to a coarse map and upsampled through
SPADE residual blocks whose normalisation is modulated by the mask. Discriminator: a multi-scale PatchGAN
(Isola et al. 2017; Wang et al. 2018, pix2pixHD) on (image, mask), spectral-normalised (Miyato et al.
2018). Losses: hinge (Lim & Ye 2017) and discriminator feature matching (Wang et al. 2018 Eq. 4).
Trained through accelerate like the DDPM, with the same pretrain-then-fine-tune recipe and checkpoints.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import spectral_norm

from augment.config import GANConfig  # noqa: F401 (re-exported)
from augment.manifest import Provenance
from augment.pairs import check_masks
from augment.training import (check_resolution, load_checkpoint, make_accelerator, prepare_training_data,
                              run_steps, sample_device, save_on_main, seeded_batches, set_lr)

KIND = "gan"


class SPADE(nn.Module):
    """Park et al. 2019 Eq. 1: gamma(m) * (x - mu) / sigma + beta(m), with parameter-free instance norm."""

    def __init__(self, channels: int, hidden: int = 32):
        super().__init__()
        self.norm = nn.InstanceNorm2d(channels, affine=False)
        self.shared = nn.Sequential(nn.Conv2d(1, hidden, 3, padding=1), nn.ReLU())
        self.gamma = nn.Conv2d(hidden, channels, 3, padding=1)
        self.beta = nn.Conv2d(hidden, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.shared(F.interpolate(mask, size=x.shape[-2:], mode="nearest"))  # (B, hidden, h, w)
        return self.norm(x) * (1 + self.gamma(h)) + self.beta(h)


class SPADEResBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = SPADE(c_in), spectral_norm(nn.Conv2d(c_in, c_out, 3, padding=1))
        self.norm2, self.conv2 = SPADE(c_out), spectral_norm(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = spectral_norm(nn.Conv2d(c_in, c_out, 1, bias=False)) if c_in != c_out else nn.Identity()

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.leaky_relu(self.norm1(x, mask), 0.2))
        h = self.conv2(F.leaky_relu(self.norm2(h, mask), 0.2))
        return self.skip(x) + h


class Generator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.start = config.resolution // 2 ** config.n_up
        chans = [max(16, config.gen_channels // 2 ** i) for i in range(config.n_up + 1)]
        self.fc = nn.Linear(config.z_dim, chans[0] * self.start ** 2)
        self.blocks = nn.ModuleList(SPADEResBlock(chans[i], chans[i + 1]) for i in range(config.n_up))
        self.final = SPADEResBlock(chans[-1], chans[-1])
        self.out = nn.Conv2d(chans[-1], 1, 3, padding=1)

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # 1. noise to coarse map  (B, C0, s, s)
        x = self.fc(z).view(z.shape[0], -1, self.start, self.start)
        # 2. SPADE blocks, each followed by x2 upsampling  -> (B, C_n, R, R)
        for block in self.blocks:
            x = F.interpolate(block(x, mask), scale_factor=2, mode="nearest")
        # 3. image in z-score units (no tanh: intensities are not bounded to [-1, 1])  (B, 1, R, R)
        return self.out(F.leaky_relu(self.final(x, mask), 0.2))


class PatchDiscriminator(nn.Module):
    """One scale of the PatchGAN; returns every intermediate feature map (the last is the patch score)."""

    def __init__(self, channels: int, n_layers: int):
        super().__init__()
        layers, c_in = [], 2
        for i in range(n_layers):
            c_out = channels * 2 ** i
            layers.append(nn.Sequential(spectral_norm(nn.Conv2d(c_in, c_out, 4, stride=2, padding=1)),
                                        nn.LeakyReLU(0.2)))
            c_in = c_out
        layers.append(spectral_norm(nn.Conv2d(c_in, 1, 3, padding=1)))
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = []
        for layer in self.layers:
            x = layer(x)
            feats.append(x)
        return feats


class MultiScaleDiscriminator(nn.Module):
    def __init__(self, config: GANConfig):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(config.disc_channels, config.disc_layers)
                                    for _ in range(config.disc_scales))

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> list[list[torch.Tensor]]:
        x = torch.cat([image, mask * 2 - 1], 1)  # (B, 2, R, R)
        out = []
        for d in self.scales:
            out.append(d(x))
            x = F.avg_pool2d(x, 3, stride=2, padding=1, count_include_pad=False)  # next scale: half size
        return out


def _hinge_d(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    # Lim & Ye 2017: E[max(0, 1 - D(x))] + E[max(0, 1 + D(G(z)))]
    return sum(F.relu(1 - r[-1]).mean() + F.relu(1 + f[-1]).mean() for r, f in zip(real, fake)) / len(real)


def _feature_matching(real: list[list[torch.Tensor]], fake: list[list[torch.Tensor]]) -> torch.Tensor:
    # Wang et al. 2018 Eq. 4: L1 between discriminator features of real and generated pairs, all scales/layers
    terms = [F.l1_loss(f, r.detach()) for rs, fs in zip(real, fake) for r, f in zip(rs[:-1], fs[:-1])]
    return sum(terms) / len(terms)


def train(config: GANConfig, *, pretrain_pairs=None, finetune_pairs=None, provenance: Provenance,
          out_dir: Path, init_checkpoint: Path | None = None) -> Path:
    """Same contract as `augment.ddpm.train`: pretrain, then fine-tune; returns the checkpoint path."""
    init = load_checkpoint(init_checkpoint, kind=KIND, resolution=config.resolution) if init_checkpoint else None
    pre, fine, provenance = prepare_training_data(pretrain_pairs, finetune_pairs, provenance,
                                                  resolution=config.resolution, init=init)
    torch.manual_seed(config.seed)
    accelerator = make_accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    gen, disc = Generator(config), MultiScaleDiscriminator(config)
    if init is not None:
        gen.load_state_dict(init["state"]["generator"])
        disc.load_state_dict(init["state"]["discriminator"])
    opt_g = torch.optim.AdamW(gen.parameters(), lr=config.lr_g, betas=(0.0, 0.99), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=config.lr_d, betas=(0.0, 0.99), weight_decay=0.0)
    gen, disc, opt_g, opt_d = accelerator.prepare(gen, disc, opt_g, opt_d)
    z_gen = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)

    def judge(first: torch.Tensor, second: torch.Tensor, masks: torch.Tensor):
        """One discriminator pass over both halves (one DDP forward per backward); returns per-half features."""
        feats = disc(torch.cat([first, second]), torch.cat([masks, masks]))  # scales x layers, (2B, ...)
        halves = [[f.chunk(2) for f in scale] for scale in feats]
        return [[f[0] for f in s] for s in halves], [[f[1] for f in s] for s in halves]

    def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
        # 1. generate  (B, 1, R, R)
        z = torch.randn((images.shape[0], config.z_dim), generator=z_gen).to(images.device)
        with accelerator.autocast():
            fake = gen(z, masks)
            # 2. discriminator step on real and detached fake pairs (hinge)
            loss_d = _hinge_d(*judge(images, fake.detach(), masks))
        accelerator.backward(loss_d)
        opt_d.step()
        opt_d.zero_grad(set_to_none=True)
        # 3. generator step: hinge adversarial term -E[D(G(z))] plus feature matching
        with accelerator.autocast():
            d_real, d_fake = judge(images, fake, masks)
            adv = -sum(f[-1].mean() for f in d_fake) / len(d_fake)
            fm = _feature_matching(d_real, d_fake)
            loss_g = adv + config.fm_weight * fm
        accelerator.backward(loss_g)
        opt_g.step()
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # drop the gradients the generator step left in D
        return {"d": loss_d.item(), "g_adv": adv.item(), "fm": fm.item()}

    history = {}
    phases = [("pretrain", pre, config.pretrain_steps, 1.0),
              ("finetune", fine, config.finetune_steps, config.finetune_lr_scale)]
    for name, pairs, n_steps, scale in phases:
        if pairs is None or n_steps == 0:
            continue
        set_lr(opt_g, config.lr_g * scale)
        set_lr(opt_d, config.lr_d * scale)
        batches = seeded_batches(*pairs, batch_size=config.batch_size, seed=config.seed + len(history),
                                 device=accelerator.device, process_index=accelerator.process_index)
        history[name] = run_steps(step, batches, n_steps, desc=f"gan {name}", accelerator=accelerator)
    accelerator.wait_for_everyone()
    state = {"generator": {k: v.detach().cpu() for k, v in accelerator.unwrap_model(gen).state_dict().items()},
             "discriminator": {k: v.detach().cpu() for k, v in accelerator.unwrap_model(disc).state_dict().items()}}
    return save_on_main(accelerator, out_dir, kind=KIND, config=config, state=state, provenance=provenance,
                        history=history)


def load(checkpoint: Path | dict, *, resolution: int | None = None) -> tuple[Generator, GANConfig, dict]:
    """Rebuild the generator and its config from a checkpoint path or an already loaded checkpoint."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND,
                                                                           resolution=resolution)
    config = GANConfig(**ckpt["config"])
    gen = Generator(config)
    gen.load_state_dict(ckpt["state"]["generator"])
    return gen.eval(), config, ckpt


@torch.no_grad()
def sample(checkpoint: Path | dict, masks, *, seed: int, steps: int | None = None, batch_size: int = 32,
           device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(N, 1, R, R)` for `masks` `(N, 1, R, R)`; returns `(images, masks)` like `ddpm.sample`.

    `steps` is accepted for a common signature and ignored (one forward pass per batch). `device` None: the GPU
    if the checkpoint was trained with cpu = false and there is one (`augment.training.sample_device`).
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND)
    device = sample_device(ckpt, device)
    m = check_masks(masks, "masks")
    check_resolution(ckpt, *m.shape[-2:])
    gen, config, _ = load(ckpt)
    gen.to(device)
    g = torch.Generator().manual_seed(seed)
    out = []
    for chunk in m.split(batch_size):
        z = torch.randn((chunk.shape[0], config.z_dim), generator=g).to(device)  # (B, z_dim)
        out.append(gen(z, chunk.to(device)).cpu())
    return torch.cat(out), m
