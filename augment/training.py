"""Pieces shared by the DDPM and GAN trainers: accelerator, seeded batches, the step loop, checkpoints.

A checkpoint is one file `checkpoint.pt` holding the generator kind, its frozen config (so the file alone
rebuilds the model), the provenance of its training data and the weights; `config.json` beside it repeats
the config and provenance for a person to read. Files are written to a temporary name and renamed, so a
failed run leaves no half-written checkpoint.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from augment.manifest import LeakageError, Provenance, check_no_leakage, merge
from augment.pairs import PairError, as_pairs

CHECKPOINT_FILE = "checkpoint.pt"


def make_accelerator(*, cpu: bool, mixed_precision: str) -> Accelerator:
    """Accelerator for CPU, one GPU or several processes; bf16/fp16 autocast only when a GPU is used."""
    use_cpu = cpu or not torch.cuda.is_available()
    return Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else mixed_precision)


def seeded_batches(images: torch.Tensor, masks: torch.Tensor, *, batch_size: int, seed: int,
                   device: torch.device, process_index: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless random batches `(B, 1, H, W)` drawn with replacement, so 3 support pairs still fill a batch.

    Each process draws from its own seeded generator (seed + process index), which keeps runs reproducible
    without relying on a sampler that accelerate would re-shard.
    """
    gen = torch.Generator().manual_seed(seed * 1000 + process_index)
    while True:
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen)
        yield images[idx].to(device), masks[idx].to(device)


def run_steps(step: Callable[[torch.Tensor, torch.Tensor], dict[str, float]],
              batches: Iterator[tuple[torch.Tensor, torch.Tensor]], n_steps: int, *, desc: str,
              accelerator: Accelerator) -> list[dict[str, float]]:
    """Call `step(images, masks)` `n_steps` times with a progress bar; return the per-step losses."""
    history: list[dict[str, float]] = []
    bar = tqdm(range(n_steps), desc=desc, disable=not accelerator.is_local_main_process, mininterval=5)
    for _ in bar:
        images, masks = next(batches)
        losses = step(images, masks)
        history.append(losses)
        bar.set_postfix({k: f"{v:.3f}" for k, v in losses.items()}, refresh=False)
    return history


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def prepare_training_data(pretrain_pairs, finetune_pairs, provenance: Provenance, *, resolution: int,
                          init: dict | None) -> tuple[tuple | None, tuple | None, Provenance]:
    """Validate both pair sets against the config resolution and the provenance; return tensors.

    Raises `PairError` for bad arrays or zero pairs and `LeakageError` when a query volume is among the
    training slices (including those of the init checkpoint). Nothing is written here.
    """
    pre = as_pairs(pretrain_pairs, "pretrain_pairs", resolution=resolution) if pretrain_pairs is not None else None
    fine = as_pairs(finetune_pairs, "finetune_pairs", resolution=resolution) if finetune_pairs is not None else None
    if pre is None and fine is None:
        raise PairError("zero training pairs: pretrain_pairs and finetune_pairs are both None")
    for name, pairs, recorded in (("pretrain", pre, provenance.pretrain), ("finetune", fine, provenance.finetune)):
        n = 0 if pairs is None else pairs[0].shape[0]
        if n != len(recorded):
            raise PairError(f"provenance.{name} lists {len(recorded)} slices but {name}_pairs holds {n} pairs; "
                            f"the manifest must say exactly which slices went in")
    if init is not None:
        provenance = merge(Provenance.from_dict(init["provenance"]), provenance)
    check_no_leakage(provenance)
    return pre, fine, provenance


def save_checkpoint(out_dir: Path, *, kind: str, config, state: dict, provenance: Provenance,
                    history: dict, accelerator: Accelerator) -> Path:
    """Write `out_dir/checkpoint.pt` and `out_dir/config.json` atomically; return the checkpoint path."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runtime = {"device": str(accelerator.device), "num_processes": accelerator.num_processes,
               "mixed_precision": str(accelerator.mixed_precision)}
    meta = {"kind": kind, "config": dataclasses.asdict(config), "provenance": provenance.to_dict(),
            "runtime": runtime, "versions": {"torch": torch.__version__}}
    path = out_dir / CHECKPOINT_FILE
    tmp = out_dir / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    try:
        torch.save({**meta, "state": state}, tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    summary = {f"{phase}/{k}": round(sum(h[k] for h in steps[-20:]) / len(steps[-20:]), 5)
               for phase, steps in history.items() if steps for k in steps[-1]}  # mean of the last 20 steps
    (out_dir / "config.json").write_text(json.dumps({**meta, "final_losses": summary,
                                                     "sha256": file_hash(path)}, indent=2, default=str))
    return path


def save_on_main(accelerator: Accelerator, out_dir: Path, *, kind: str, config, state: dict,
                 provenance: Provenance, history: dict) -> Path:
    """Save the checkpoint from the main process only, then let every process return its path."""
    path = Path(out_dir) / CHECKPOINT_FILE
    if accelerator.is_main_process:
        path = save_checkpoint(out_dir, kind=kind, config=config, state=state, provenance=provenance,
                               history=history, accelerator=accelerator)
    accelerator.wait_for_everyone()
    return path


def load_checkpoint(path: Path, *, kind: str | None, resolution: int | None = None) -> dict:
    """Load a checkpoint written by `save_checkpoint`, checking its kind (None: any) and its resolution."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        raise ValueError(f"{path} is not a SupportForge generator checkpoint (no 'kind'/'config' entries)")
    if kind is not None and ckpt["kind"] != kind:
        raise ValueError(f"checkpoint {path} holds a {ckpt.get('kind')!r} generator, expected {kind!r}")
    ckpt["path"] = str(path)
    ckpt["sha256"] = file_hash(path)
    if resolution is not None:
        check_resolution(ckpt, resolution, resolution)
    return ckpt


def check_resolution(ckpt: dict, height: int, width: int) -> None:
    """Raise `PairError` when inputs of `height` x `width` do not match the checkpoint's resolution."""
    trained = ckpt["config"]["resolution"]
    if (height, width) != (trained, trained):
        raise PairError(f"checkpoint {ckpt.get('path', '(in memory)')} was trained at {trained}x{trained}, "
                        f"but the input is {height}x{width}; resample the masks or retrain")


def file_hash(path: Path) -> str:
    """SHA-256 of a file, the checkpoint id written into every synthetic-set manifest."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


__all__ = ["LeakageError", "PairError", "make_accelerator", "seeded_batches", "run_steps", "set_lr",
           "prepare_training_data", "save_checkpoint", "load_checkpoint", "check_resolution", "file_hash",
           "CHECKPOINT_FILE"]
