"""Mask-conditioned DDPM on diffusers' `UNet2DModel`: the mask is concatenated to the noisy image.

Training follows Ho et al. 2020 (DDPM) with epsilon or v prediction (Salimans & Ho 2022), AdamW and an EMA
of the weights (`diffusers.training_utils.EMAModel`), through accelerate (CPU, one GPU or several processes;
bf16/fp16 autocast only on GPU). Sampling uses a few-step scheduler, DDIM (Song et al. 2021) or DPM-Solver++
(Lu et al. 2022), in batches. In `joint` mode image and mask are denoised together as two channels and the
mask is thresholded after sampling; `sample` has the same signature in both modes.

Recipe (issue 4 item 4): `train` on the unlabelled pool of the fold's training volumes with caller-given
conditioning masks (e.g. superpixels), then `train` again with `init_checkpoint=` on the class's support
pairs, then `sample` for deformed support masks (`augment.synthesis.synthesize`).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler,
                       UNet2DModel)
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from augment.config import PREDICTIONS, PRECISIONS, SAMPLERS, DDPMConfig  # noqa: F401 (re-exported)
from augment.manifest import Provenance
from augment.pairs import as_pairs, check_masks
from augment.training import (check_resolution, load_checkpoint, make_accelerator, prepare_training_data,
                              run_steps, sample_device, save_on_main, seeded_batches, set_lr)

KIND = "ddpm"


def build_unet(config: DDPMConfig) -> UNet2DModel:
    """UNet with 2 input channels (noisy image + mask, or noisy image + noisy mask in joint mode)."""
    n = len(config.block_channels)
    down = ["DownBlock2D"] * n
    up = ["UpBlock2D"] * n
    if config.attention:
        down[-1], up[0] = "AttnDownBlock2D", "AttnUpBlock2D"
    return UNet2DModel(sample_size=config.resolution, in_channels=2, out_channels=2 if config.joint else 1,
                       block_out_channels=tuple(config.block_channels), layers_per_block=config.layers_per_block,
                       down_block_types=tuple(down), up_block_types=tuple(up), norm_num_groups=config.norm_groups)


def build_scheduler(config: DDPMConfig) -> DDPMScheduler:
    """Training noise schedule; when it samples (DDPMPipeline) it clamps x0 to +-x0_clip, not to [-1, 1]."""
    return DDPMScheduler(num_train_timesteps=config.train_timesteps, beta_schedule=config.beta_schedule,
                         prediction_type=config.prediction_type, clip_sample=True,
                         clip_sample_range=config.x0_clip)


class _ClampedDPMSolver(DPMSolverMultistepScheduler):
    """DPM-Solver++ whose x0 "thresholding" is a plain clamp to +-sample_max_value.

    diffusers' dynamic thresholding (Saharia et al. 2022) also rescales x0 into [-1, 1], which suits pixel
    data but not z-scored intensities; early in training an unclamped x0 = (x_t - sigma_t eps) / alpha_t
    explodes at the first, nearly pure-noise step.
    """

    def _threshold_sample(self, sample: torch.Tensor) -> torch.Tensor:
        return sample.clamp(-self.config.sample_max_value, self.config.sample_max_value)


def few_step_scheduler(config: DDPMConfig, name: str | None = None):
    """DDIM or DPM-Solver++ sharing the training noise schedule."""
    name = name or config.sampler
    if name not in SAMPLERS:
        raise ValueError(f"sampler={name!r}; valid: {list(SAMPLERS)}")
    base = build_scheduler(config).config
    if name == "ddim":
        return DDIMScheduler.from_config(base)  # inherits clip_sample_range = x0_clip
    return _ClampedDPMSolver.from_config(base, algorithm_type="dpmsolver++", solver_order=2, thresholding=True,
                                         sample_max_value=config.x0_clip)


def _x0_and_cond(images: torch.Tensor, masks: torch.Tensor, joint: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Diffused channels and conditioning channels: masks enter as {-1, 1}."""
    m = masks * 2 - 1
    if joint:
        return torch.cat([images, m], 1), None  # (B, 2, H, W)
    return images, m                              # (B, 1, H, W), (B, 1, H, W)


def _unet_input(x_t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
    return x_t if cond is None else torch.cat([x_t, cond], 1)  # (B, 2, H, W)


def train(config: DDPMConfig, *, pretrain_pairs=None, finetune_pairs=None, provenance: Provenance,
          out_dir: Path, init_checkpoint: Path | None = None) -> Path:
    """Pretrain on `pretrain_pairs`, then fine-tune on `finetune_pairs`; return the checkpoint path.

    Pairs are `(images (N, 1, R, R) float32, masks (N, 1, R, R) {0, 1})` with R = config.resolution, aligned
    with `provenance.pretrain` / `provenance.finetune`. With `init_checkpoint` training starts from its EMA
    weights (typically: pretrained once per fold, fine-tuned per class). Bad inputs and leakage raise before
    anything is written.
    """
    init = load_checkpoint(init_checkpoint, kind=KIND, resolution=config.resolution) if init_checkpoint else None
    pre, fine, provenance = prepare_training_data(pretrain_pairs, finetune_pairs, provenance,
                                                  resolution=config.resolution, init=init)
    torch.manual_seed(config.seed)
    accelerator = make_accelerator(cpu=config.cpu, mixed_precision=config.mixed_precision)
    unet = build_unet(config)
    if init is not None:
        unet.load_state_dict(init["state"]["unet"])
    scheduler = build_scheduler(config)
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    unet, optimizer = accelerator.prepare(unet, optimizer)
    noise_gen = torch.Generator().manual_seed(config.seed * 7919 + accelerator.process_index)
    history, ema = {}, None
    phases = [("pretrain", pre, config.pretrain_steps, config.lr),
              ("finetune", fine, config.finetune_steps, config.finetune_lr)]
    for name, pairs, n_steps, lr in phases:
        if pairs is None or n_steps == 0:
            continue
        set_lr(optimizer, lr)
        # a fresh EMA per phase, with warm-up, so a short fine-tune is not averaged away by pretraining
        ema = EMAModel(accelerator.unwrap_model(unet).parameters(), decay=config.ema_max_decay,
                       use_ema_warmup=True, power=3 / 4)

        def step(images: torch.Tensor, masks: torch.Tensor) -> dict[str, float]:
            # 1. clean sample and condition  (B, C, H, W)
            x0, cond = _x0_and_cond(images, masks, config.joint)
            # 2. forward process q(x_t | x_0), Ho et al. 2020 Eq. 4: x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps
            noise = torch.randn(x0.shape, generator=noise_gen).to(x0.device)
            t = torch.randint(0, config.train_timesteps, (x0.shape[0],), generator=noise_gen).to(x0.device)
            x_t = scheduler.add_noise(x0, noise, t)
            # 3. target: eps (Ho et al. 2020 Eq. 14) or v = sqrt(abar) eps - sqrt(1 - abar) x0 (Salimans & Ho 2022)
            target = noise if config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
            # 4. denoise, regress, update weights and EMA
            with accelerator.autocast():
                pred = unet(_unet_input(x_t, cond), t).sample
            loss = F.mse_loss(pred.float(), target)
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ema.step(accelerator.unwrap_model(unet).parameters())
            return {"loss": loss.item()}

        batches = seeded_batches(*pairs, batch_size=config.batch_size, seed=config.seed + len(history),
                                 device=accelerator.device, process_index=accelerator.process_index)
        history[name] = run_steps(step, batches, n_steps, desc=f"ddpm {name}", accelerator=accelerator)
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(unet)
    if ema is not None:
        ema.copy_to(final.parameters())  # sample with the EMA weights
    state = {"unet": {k: v.detach().cpu() for k, v in final.state_dict().items()}}
    return save_on_main(accelerator, out_dir, kind=KIND, config=config, state=state, provenance=provenance,
                        history=history)


def load(checkpoint: Path | dict, *, resolution: int | None = None) -> tuple[UNet2DModel, DDPMConfig, dict]:
    """Rebuild the (EMA) UNet and its config from a checkpoint path or an already loaded checkpoint."""
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND,
                                                                           resolution=resolution)
    cfg = dict(ckpt["config"])
    cfg["block_channels"] = tuple(cfg["block_channels"])
    config = DDPMConfig(**cfg)
    unet = build_unet(config)
    unet.load_state_dict(ckpt["state"]["unet"])
    return unet.eval(), config, ckpt


@torch.no_grad()
def sample(checkpoint: Path | dict, masks, *, seed: int, steps: int | None = None, sampler: str | None = None,
           batch_size: int | None = None,
           device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images `(N, 1, R, R)` for `masks` `(N, 1, R, R)`; returns `(images, masks)`.

    Conditional mode returns the given masks; joint mode ignores their content (only N is used) and returns
    the sampled masks thresholded at 0. `steps`/`sampler` default to the config's few-step sampler. `device`
    None: the GPU if the checkpoint was trained with cpu = false and there is one (`sample_device`).
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND)
    device = sample_device(ckpt, device)
    res = ckpt["config"]["resolution"]
    m = check_masks(masks, "masks")
    check_resolution(ckpt, *m.shape[-2:])
    unet, config, _ = load(ckpt)
    unet.to(device)
    scheduler = few_step_scheduler(config, sampler)
    steps = steps or config.sample_steps
    gen = torch.Generator().manual_seed(seed)
    images, out_masks = [], []
    bs = batch_size or config.sample_batch
    for chunk in tqdm(m.split(bs), desc=f"ddpm sample ({scheduler.__class__.__name__}, {steps} steps)",
                      disable=len(m) <= bs, mininterval=5):
        # 1. condition and starting noise x_T ~ N(0, I)  (B, C, H, W)
        _, cond = _x0_and_cond(torch.zeros_like(chunk), chunk, config.joint)
        x = torch.randn((chunk.shape[0], 2 if config.joint else 1, res, res), generator=gen).to(device)
        cond = None if cond is None else cond.to(device)
        # 2. reverse process with the few-step solver
        scheduler.set_timesteps(steps)
        x = _reverse(unet, scheduler, x, cond, scheduler.timesteps)
        # 3. split image and mask
        images.append(x[:, :1].cpu())
        out_masks.append((x[:, 1:2] > 0).float().cpu() if config.joint else chunk)
    return torch.cat(images), torch.cat(out_masks)


def _reverse(unet: UNet2DModel, scheduler, x: torch.Tensor, cond: torch.Tensor | None, timesteps) -> torch.Tensor:
    """Run the solver's reverse steps `timesteps` from `x` `(B, C, H, W)`."""
    for t in timesteps:
        out = unet(_unet_input(x, cond), t).sample
        x = scheduler.step(out, t, x).prev_sample
    return x


def sdedit_steps(steps: int, strength: float) -> int:
    """How many of the sampler's `steps` SDEdit runs: the trajectory's last int(steps * strength), as in
    diffusers' img2img pipelines (0 keeps the image, `steps` is the whole trajectory)."""
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength={strength}; it is the fraction of the diffusion trajectory, in [0, 1]")
    return min(int(steps * strength), steps)


@torch.no_grad()
def sdedit(checkpoint: Path | dict, images, masks, *, strength: float, seed: int, steps: int | None = None,
           sampler: str | None = None, batch_size: int | None = None,
           device: torch.device | str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SDEdit (Meng et al. 2022): each image `(N, 1, R, R)` noised to `strength` of the trajectory and denoised
    for its mask, which is kept; returns `(images, masks)`.

    Only the last `sdedit_steps(steps, strength)` steps of the few-step sampler run. strength 0 returns the
    images unchanged; the whole trajectory discards them and starts from the same noise as `sample`, so it
    equals `sample` with the same seed. A joint DDPM (which would redraw the mask) is refused.
    """
    ckpt = checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND)
    device = sample_device(ckpt, device)  # None: as in `sample`
    x0, m = as_pairs((images, masks), "sdedit pairs")
    check_resolution(ckpt, *m.shape[-2:])
    if ckpt["config"].get("joint"):
        raise ValueError(f"sdedit keeps the masks, but checkpoint {ckpt.get('path', '(in memory)')} is a joint "
                         f"DDPM that denoises the mask too; use one trained with joint = false")
    unet, config, _ = load(ckpt)
    steps = steps or config.sample_steps
    run = sdedit_steps(steps, strength)
    if run == 0:
        return x0.clone(), m
    unet.to(device)
    scheduler = few_step_scheduler(config, sampler)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for chunk, chunk_m in zip(x0.split(batch_size or config.sample_batch), m.split(batch_size or config.sample_batch)):
        # 1. condition and noise, drawn as `sample` draws them  (B, 1, H, W)
        _, cond = _x0_and_cond(chunk, chunk_m, False)
        noise = torch.randn(chunk.shape, generator=gen).to(device)
        cond = cond.to(device)
        # 2. the trajectory's last `run` steps; diffusers' img2img convention for where they begin
        scheduler.set_timesteps(steps)
        start = (steps - run) * scheduler.order
        timesteps = scheduler.timesteps[start:]
        if start == 0:
            x = noise  # the whole trajectory: x_T ~ N(0, I), as in `sample`
        else:
            if hasattr(scheduler, "set_begin_index"):
                scheduler.set_begin_index(start)
            # 3. x(t0) ~ q(x_t0 | x_0), Meng et al. 2022 Alg. 1 (VP-SDE): sqrt(abar) x0 + sqrt(1 - abar) eps
            x = scheduler.add_noise(chunk.to(device), noise, timesteps[:1].repeat(len(chunk)))
        # 4. reverse process from t0 with the same solver
        out.append(_reverse(unet, scheduler, x, cond, timesteps).cpu())
    return torch.cat(out), m


class _MaskConditioned(torch.nn.Module):
    """Presents the conditional UNet to `DDPMPipeline` as an unconditional 1-channel model for fixed masks."""

    def __init__(self, unet: UNet2DModel, masks: torch.Tensor):
        super().__init__()
        self.unet, self.cond = unet, masks * 2 - 1
        self.config = SimpleNamespace(in_channels=1, sample_size=unet.config.sample_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def forward(self, sample: torch.Tensor, t) -> SimpleNamespace:
        cond = self.cond[: sample.shape[0]].to(sample.device)  # (B, 1, H, W)
        return SimpleNamespace(sample=self.unet(torch.cat([sample, cond], 1), t).sample)


def reference_pipeline(checkpoint: Path | dict, masks) -> DDPMPipeline:
    """diffusers' `DDPMPipeline` (ancestral sampling, 1000 steps by default) on the same trained model.

    Used by the benchmark to measure the few-step sampler's speed-up; conditional mode only.
    """
    unet, config, _ = load(checkpoint if isinstance(checkpoint, dict) else load_checkpoint(checkpoint, kind=KIND))
    if config.joint:
        raise ValueError("reference_pipeline supports conditional mode only (config.joint=False)")
    m = check_masks(masks, "masks", resolution=config.resolution)
    pipe = DDPMPipeline(unet=_MaskConditioned(unet, m), scheduler=build_scheduler(config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def with_overrides(config: DDPMConfig, **changes) -> DDPMConfig:
    """A copy of `config` with some fields changed (validated again)."""
    return dataclasses.replace(config, **changes)
