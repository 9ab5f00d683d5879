"""Episodic training of the few-shot segmenters with accelerate: CPU, one GPU, or several processes.

`train` learns a segmenter for one fold from superpixel, supervised (training classes only) and
external-pair episodes; `finetune` adapts a trained one on a pool of (image, mask) pairs of the novel
class; `load` rebuilds a model from a checkpoint alone. Each step's episodes come from a generator
seeded by (seed, step, process), and the learning rate is a function of the step, so a run resumed from
its last checkpoint retraces the uninterrupted run exactly (on CPU, bit for bit).
Multi-process on CPU: `torchrun --nproc_per_node 2 script.py` with `cpu=True` in the config (gloo).
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from tqdm import tqdm

from segment.conditional import ConditionalConfig, ConditionalNet
from segment.config import MODELS, SETTINGS, SegmenterConfig, SuperpixelParams  # noqa: F401 (re-exported)
from segment.encoder import CheckpointError, EncoderConfig, load_encoder_weights, load_tensors
from segment.episodes import (AugmentParams, Augmenter, MixedSampler, PairSampler, SuperpixelSampler,
                              SupervisedSampler, collate)
from segment.pooling import SegmentInputError
from segment.prototype import PrototypeConfig, PrototypeNet
from segment.data.superpixels import superpixels

def build_model(config: SegmenterConfig) -> torch.nn.Module:
    """The untrained network that `config` describes."""
    if config.model == "prototype":
        enc = EncoderConfig(width=config.width, depth=config.depth, dilated_blocks=config.dilated_blocks,
                            embed_dim=config.embed_dim, norm=config.norm, fuse_stem=config.fuse_stem,
                            coords=config.coords)
        kernel = max(1, (config.resolution // enc.stride) // 8)  # ALPNet: an 8 x 8 grid of local cells
        return PrototypeNet(config=PrototypeConfig(encoder=enc, resolution=config.resolution, local_kernel=kernel,
                                                   align=config.align_weight > 0))
    return ConditionalNet(config=ConditionalConfig(resolution=config.resolution, width=config.width,
                                                   cond_width=max(4, config.width // 2), levels=config.depth + 1,
                                                   norm=config.norm, spatial_gates=config.spatial_gates,
                                                   similarity_gates=config.similarity_gates,
                                                   similarity_head=config.similarity_head))


def read_checkpoint(path: Path) -> dict:
    """A checkpoint written by `save_checkpoint`, read with `weights_only=True` (`load_tensors`): a file
    swapped for a pickle that would run code raises `CheckpointError` and is never run."""
    state = load_tensors(path, "segmenter checkpoint")
    if not isinstance(state, dict) or "config" not in state or "state_dict" not in state:
        raise CheckpointError(f"{path} is not a segmenter checkpoint: expected keys 'config' and 'state_dict'")
    return state


def checkpoint_config(raw: dict) -> SegmenterConfig:
    """The config a checkpoint was trained with. A field added since it was written takes the value that
    reproduces the model it holds, not today's default: no similarity head, and the conditional net's
    loss weights as the shared `bg_weight` without Dice (before issue 13)."""
    before = {"similarity_head": False, "conditional_bg_weight": raw.get("bg_weight", 0.1),
              "conditional_dice_weight": 0.0}
    return SegmenterConfig.from_dict({**{k: v for k, v in before.items() if k not in raw}, **raw})


def save_checkpoint(path: Path, model: torch.nn.Module, config: SegmenterConfig, **extra) -> None:
    """Write config + weights (+ extra) atomically: a crash never leaves a half-written checkpoint."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save({"config": asdict(config), "state_dict": model.state_dict(), **extra}, tmp)
    os.replace(tmp, path)


def load(checkpoint: str | Path) -> torch.nn.Module:
    """Rebuild the model of `checkpoint` from the config it carries; returned in eval mode on CPU."""
    path = Path(checkpoint)
    if not path.is_file():
        raise FileNotFoundError(f"segmenter checkpoint {path} does not exist")
    state = read_checkpoint(path)
    model = build_model(checkpoint_config(state["config"]))
    model.load_state_dict(state["state_dict"])
    return model.eval()


def learning_rate(config: SegmenterConfig, step: int, steps: int, lr: float) -> float:
    """Linear warm-up, then cosine decay to 5 % (a pure function of the step, so resume is exact)."""
    if step < config.warmup:
        return lr * (step + 1) / config.warmup
    t = (step - config.warmup) / max(1, steps - config.warmup)
    return lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(t, 1.0))))


def soft_dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """1 - soft Dice of the foreground, per query image, averaged (Milletari et al. 2016, V-Net eq. 1).

    logits (N, 2, H, W), target (N, H, W) in {0, 1}; `smooth` keeps an empty mask's loss finite.
    """
    fg = F.softmax(logits, dim=1)[:, 1]  # (N, H, W)
    inter = (fg * target).sum(dim=(1, 2))
    dice = (2 * inter + smooth) / (fg.sum(dim=(1, 2)) + target.sum(dim=(1, 2)) + smooth)  # (N,)
    return 1 - dice.mean()


def episode_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, ...], config: SegmenterConfig) -> torch.Tensor:
    """Weighted cross-entropy on the queries, plus soft Dice and the model's auxiliary (alignment) loss
    with the weights of `config.loss_weights()` and `config.align_weight`."""
    support_images, support_masks, query_images, query_masks = batch
    logits, aux = model(support_images, support_masks, query_images)  # (B, Q, 2, H, W)
    bg_weight, dice_weight = config.loss_weights()
    target = query_masks.flatten(0, 1)[:, 0].round().long()  # (B * Q, H, W)
    weight = torch.tensor([bg_weight, 1.0], device=logits.device)
    loss = F.cross_entropy(logits.flatten(0, 1), target, weight=weight)
    if dice_weight > 0:
        loss = loss + dice_weight * soft_dice_loss(logits.flatten(0, 1), target.float())
    return loss + config.align_weight * aux


def _fit(model: torch.nn.Module, sampler, config: SegmenterConfig, out_dir: Path, *, steps: int, lr: float,
         meta: dict, stop_at: int | None, desc: str) -> Path:
    """The training loop shared by `train` and `finetune`; returns the final checkpoint path."""
    final, last = out_dir / "model.pt", out_dir / "last.pt"
    _check_same_run(out_dir, meta)
    if final.is_file():  # finished before: the checkpoint is the result
        return final
    accelerator = Accelerator(cpu=config.cpu)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=config.weight_decay)
    start = 0
    # 1. resume: weights, optimiser moments and the step of the last checkpoint
    if last.is_file():
        state = read_checkpoint(last)
        model.load_state_dict(state["state_dict"])
        optimizer.load_state_dict(state["optimizer"])
        start = int(state["step"])
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    end = steps if stop_at is None else min(steps, stop_at)
    bar = tqdm(range(start, end), initial=start, total=steps, desc=desc, unit="step",
               disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    t0 = time.time()
    for step in bar:
        # 2. this step's episodes: a pure function of (seed, step, process)
        rng = np.random.default_rng([config.seed, step, accelerator.process_index])
        batch = tuple(t.to(accelerator.device) for t in collate([sampler.sample(rng) for _ in range(config.batch)]))
        # 3. learning rate from the step alone
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step, steps, lr)
        # 4. loss, backward (all-reduced across processes), clipped update
        loss = episode_loss(model, batch, config)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(model.parameters(), 5.0)
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{optimizer.param_groups[0]['lr']:.1e}")
        # 5. periodic resumable checkpoint, written by the main process only
        if (step + 1) % config.checkpoint_every == 0 or step + 1 == end:
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                save_checkpoint(last, accelerator.unwrap_model(model), config, step=step + 1,
                                optimizer=optimizer.state_dict(), meta=meta)
    accelerator.wait_for_everyone()
    if end < steps:  # stopped early on purpose: `last.pt` resumes it
        return last
    # 6. final checkpoint: config + weights + what produced them
    if accelerator.is_main_process:
        save_checkpoint(final, accelerator.unwrap_model(model), config, step=steps,
                        meta={**meta, "seconds_this_run": round(time.time() - t0, 1),
                              "processes": accelerator.num_processes, "device": str(accelerator.device)})
        (out_dir / "config.json").write_text(json.dumps({"config": asdict(config), **meta}, indent=2))
        last.unlink(missing_ok=True)
    accelerator.wait_for_everyone()
    return final


def _check_resumable(out_dir: Path, config: SegmenterConfig) -> None:
    """Refuse to resume or reuse a checkpoint in `out_dir` that another config wrote."""
    for name in ("model.pt", "last.pt"):
        path = out_dir / name
        if path.is_file():
            saved = asdict(checkpoint_config(read_checkpoint(path)["config"]))
            if saved != asdict(config):  # compared with defaults filled in, so older checkpoints still match
                diff = {k: (saved.get(k), v) for k, v in asdict(config).items() if saved.get(k) != v}
                raise ValueError(f"{path} was written by another config (saved vs now: {diff}); "
                                 "use a fresh out_dir or delete it")


def _check_same_run(out_dir: Path, meta: dict) -> None:
    """Refuse to resume or reuse a checkpoint of another fold, data set, class split or setting."""
    for name in ("model.pt", "last.pt"):
        path = out_dir / name
        if path.is_file():
            saved = read_checkpoint(path).get("meta", {})
            diff = {k: (saved.get(k), v) for k, v in meta.items() if saved.get(k) != v}
            if diff:
                raise ValueError(f"{path} was written for another run (saved vs now: {diff}); "
                                 "use a fresh out_dir or delete it")


def training_sampler(config: SegmenterConfig, data, fold, *, test_class_ids: tuple[int, ...], setting: int,
                     extra_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
                     cache_dir: str | Path | None = None) -> MixedSampler:
    """The episode mix of one fold: only the fold's training volumes, never a test-class label.

    Setting 1 relabels the excluded classes as background; Setting 2 also drops every slice holding
    any class of the excluded group (OR rule), from the supervised and the superpixel episodes alike.
    """
    from segment.data.protocol import excluded_class_ids, mask_out_classes, training_slice_mask

    if setting not in SETTINGS:
        raise ValueError(f"setting must be one of {SETTINGS}, got {setting!r}")
    names = data.spec.classes
    bad = [c for c in test_class_ids if not 1 <= c <= len(names)]
    if bad:
        raise ValueError(f"test_class_ids {bad} are not class ids of {data.spec.name!r} (1..{len(names)})")
    excluded = tuple(sorted({e for c in test_class_ids for e in excluded_class_ids(data.spec, names[c - 1], setting)}))
    augment = Augmenter(AugmentParams() if config.augment else None)
    images, labels, allowed = {}, {}, {}
    for vid in fold.train:
        vol = data.volume(vid)
        images[vid] = vol.images
        labels[vid] = mask_out_classes(vol.labels, excluded)
        allowed[vid] = training_slice_mask(vol.labels, excluded, setting)
    sources: dict[str, tuple[object, float]] = {}
    if config.mix_superpixel > 0:
        cache = Path(cache_dir) if cache_dir is not None else data.path.parent.parent
        segs = superpixels(data, params=SuperpixelParams(scale=config.superpixel_scale), cache_dir=cache,
                           volume_ids=fold.train)
        segs = {vid: np.where(allowed[vid][:, None, None], s, 0) for vid, s in segs.items()}
        sources["superpixel"] = (SuperpixelSampler(images, segs, augment=augment, n_supports=config.n_supports,
                                                   span=config.neighbour_span, min_iou=config.neighbour_min_iou),
                                 config.mix_superpixel)
    train_classes = tuple(c for c in range(1, len(names) + 1) if c not in excluded)
    if config.mix_supervised > 0 and train_classes:
        try:
            sources["supervised"] = (SupervisedSampler(images, labels, train_classes, augment=augment,
                                                       allowed=allowed, n_supports=config.n_supports),
                                     config.mix_supervised)
        except SegmentInputError as err:
            # e.g. Setting 2 left too few slices of the other classes: train on the other episodes, and the
            # checkpoint's `episode_sources` says so; with nothing else to train on, stop
            if not sources and extra_pairs is None:
                raise
            warnings.warn(f"fold {fold.index}, test classes {list(test_class_ids)}: {err}; "
                          f"training without supervised episodes", stacklevel=2)
    if extra_pairs is not None:
        sources["pairs"] = (PairSampler(*extra_pairs, augment=augment, n_supports=config.n_supports),
                            config.mix_pairs)
    return MixedSampler(sources)


def train(config: SegmenterConfig, data, fold, *, test_class_ids: tuple[int, ...], setting: int,
          out_dir: str | Path, extra_pairs: tuple[torch.Tensor, torch.Tensor] | None = None,
          cache_dir: str | Path | None = None, stop_at: int | None = None) -> Path:
    """Train a segmenter for `fold` (a `protocol.Fold`) of `data` (a `PreparedData`); returns `model.pt`.

    Uses only `fold.train` volumes; labels of `test_class_ids` (Setting 1) or of their groups (Setting 2)
    are never used. `extra_pairs` = (images (N, 1, H, W), masks (N, 1, H, W)) are mixed in with weight
    `mix_pairs`. Re-running with the same `out_dir` resumes from `last.pt`; `stop_at` ends the run after
    that step with a resumable checkpoint (time-sliced runs, tests).
    """
    out_dir = Path(out_dir)
    if data.resolution != config.resolution:
        raise ValueError(f"data are prepared at resolution {data.resolution} but the config says "
                         f"{config.resolution}; prepare the data at the config's resolution")
    _check_resumable(out_dir, config)
    sampler = training_sampler(config, data, fold, test_class_ids=tuple(test_class_ids), setting=setting,
                               extra_pairs=extra_pairs, cache_dir=cache_dir)
    torch.manual_seed(config.seed)
    model = build_model(config)
    if config.encoder_init:
        if not hasattr(model, "encoder"):
            raise ValueError(f"encoder_init={config.encoder_init!r} needs the prototype model, got {config.model!r}")
        load_encoder_weights(model.encoder, config.encoder_init)
    meta = {"stage": "train", "dataset": data.spec.name, "data_key": data.key, "fold": fold.index,
            "train_volumes": list(fold.train), "test_class_ids": list(test_class_ids), "setting": setting,
            "episode_sources": list(sampler.names), "extra_pairs": 0 if extra_pairs is None else len(extra_pairs[0])}
    return _fit(model, sampler, config, out_dir, steps=config.steps, lr=config.lr, meta=meta, stop_at=stop_at,
                desc=f"train {config.model} fold {fold.index}")


def finetune(checkpoint: str | Path, images: torch.Tensor, masks: torch.Tensor, *, out_dir: str | Path,
             steps: int = 300, lr: float | None = None, seed: int | None = None, batch: int | None = None,
             stop_at: int | None = None, synthetic: tuple[torch.Tensor, torch.Tensor] | None = None,
             synthetic_share: float = 0.0) -> Path:
    """Adapt a trained segmenter to a novel class from a pool of its (image, mask) pairs `(N, 1, H, W)`.

    The pool holds the real supports plus any synthetic pairs; each episode takes a support and a query
    from it, both augmented. With `synthetic` pairs `(M, 1, H, W)` and `synthetic_share` > 0, each episode
    is drawn from them with that probability and from `images` otherwise, so the share of synthetic
    episodes per batch is set rather than following the pool sizes. Returns the fine-tuned `model.pt`
    (same config, `steps` replaced).
    """
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"segmenter checkpoint {checkpoint} does not exist")
    state = read_checkpoint(Path(checkpoint))
    base = checkpoint_config(state["config"])
    config = SegmenterConfig.from_dict({**asdict(base), "steps": steps, "lr": lr or base.lr / 5,
                                        "seed": base.seed if seed is None else seed, "batch": batch or base.batch,
                                        "warmup": min(base.warmup, max(1, steps // 10)),
                                        "checkpoint_every": min(base.checkpoint_every, steps)})
    out_dir = Path(out_dir)
    _check_resumable(out_dir, config)
    augment = Augmenter(AugmentParams() if config.augment else None)
    if not 0.0 <= synthetic_share < 1.0 or (synthetic_share > 0 and synthetic is None):
        raise SegmentInputError(f"synthetic_share = {synthetic_share} needs synthetic pairs and a value in [0, 1)")
    mix = {"pairs": (PairSampler(images, masks, augment=augment, n_supports=config.n_supports,
                                 name="finetune pool"), 1.0 - synthetic_share)}
    if synthetic_share > 0:
        mix["synthetic"] = (PairSampler(*synthetic, augment=augment, n_supports=config.n_supports,
                                        name="finetune synthetic pairs"), synthetic_share)
    sampler = MixedSampler(mix)
    model = build_model(config)
    model.load_state_dict(state["state_dict"])
    meta = {"stage": "finetune", "base_checkpoint": str(checkpoint), "pool_size": int(images.shape[0])}
    if synthetic_share > 0:
        meta |= {"synthetic_pairs": int(synthetic[0].shape[0]), "synthetic_share": synthetic_share}
    return _fit(model, sampler, config, out_dir, steps=steps, lr=config.lr, meta=meta, stop_at=stop_at,
                desc=f"finetune {config.model}")
