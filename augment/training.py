"""Pieces shared by the DDPM and GAN trainers: accelerator, seeded batches, the step loop, checkpoints.

A checkpoint is a folder of two files. `checkpoint.pt` holds tensors only, `{"unet": {name: tensor}}` or
`{"generator": ..., "discriminator": ...}`, and is read with `torch.load(weights_only=True)`, so a file
swapped for a pickle that would run code is refused, never executed. `config.json` beside it holds
everything else as JSON: the generator kind, its frozen config (which rebuilds the model), the provenance of
its training data, the runtime, the final losses and the SHA-256 of `checkpoint.pt`, checked before the
weights are read. Each file is written to a temporary name and renamed, `config.json` last, so a failed
run leaves no checkpoint that loads.

The weights are the ones to sample with (the DDPM's EMA weights). Neither the EMA shadow nor the
optimiser moments are kept: fine-tuning from a checkpoint (`init_checkpoint`) starts a fresh optimiser
and a fresh EMA on purpose, so nothing else is needed after training.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import pickle
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from augment.manifest import LeakageError, Provenance, check_no_leakage, merge
from augment.pairs import PairError, as_pairs
from augment.registry import CHECKPOINT_FILE

META_FILE = "config.json"          # kind, config, provenance and the weights' SHA-256, as JSON
FORMAT = 2                         # 1: one pickled checkpoint.pt holding everything (no longer read)


class CheckpointError(ValueError):
    """A generator checkpoint is missing, damaged, of another kind or format, or not safe to read."""


def make_accelerator(*, cpu: bool, mixed_precision: str) -> Accelerator:
    """Accelerator for CPU, one GPU or several processes; bf16/fp16 autocast only when a GPU is used."""
    use_cpu = cpu or not torch.cuda.is_available()
    return Accelerator(cpu=use_cpu, mixed_precision="no" if use_cpu else mixed_precision)


def sample_device(ckpt: dict, device: torch.device | str | None = None) -> torch.device:
    """Where a generator samples: `device` when given; otherwise the GPU when the checkpoint's config was trained
    with `cpu = false` and this process has one (the choice `make_accelerator` makes for training), else the CPU.
    The starting noise is drawn on the CPU either way, so a seed gives the same noise on both."""
    if device is not None:
        return torch.device(device)
    use_cpu = ckpt["config"].get("cpu", True) or not torch.cuda.is_available()
    return torch.device("cpu" if use_cpu else "cuda")


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
    if provenance.finetune_source and len(provenance.finetune_source) != len(provenance.finetune):
        raise PairError(f"provenance.finetune_source names {len(provenance.finetune_source)} sources for "
                        f"{len(provenance.finetune)} finetune slices; give one per row (or none: all supports)")
    if init is not None:
        provenance = merge(Provenance.from_dict(init["provenance"]), provenance)
    check_no_leakage(provenance)
    return pre, fine, provenance


def save_checkpoint(out_dir: Path, *, kind: str, config, state: dict, provenance: Provenance,
                    history: dict, accelerator: Accelerator) -> Path:
    """Write `out_dir/checkpoint.pt` (tensors), then `out_dir/config.json`, each atomically; return the first."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / CHECKPOINT_FILE
    _write_atomically(path, lambda tmp: torch.save(state, tmp))
    runtime = {"device": str(accelerator.device), "num_processes": accelerator.num_processes,
               "mixed_precision": str(accelerator.mixed_precision)}
    summary = {f"{phase}/{k}": round(sum(h[k] for h in steps[-20:]) / len(steps[-20:]), 5)
               for phase, steps in history.items() if steps for k in steps[-1]}  # mean of the last 20 steps
    meta = {"format": FORMAT, "kind": kind, "config": dataclasses.asdict(config),
            "provenance": provenance.to_dict(), "runtime": runtime, "versions": {"torch": torch.__version__},
            "final_losses": summary, "weights": CHECKPOINT_FILE, "weights_sha256": file_hash(path)}
    text = json.dumps(meta, indent=2)
    _write_atomically(out_dir / META_FILE, lambda tmp: tmp.write_text(text))
    return path


def _write_atomically(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


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
    """Load a checkpoint written by `save_checkpoint` (its folder or its `checkpoint.pt`).

    Checks, in this order and before any weight is read: `config.json` exists and is this format, the kind
    (None: any), the resolution, and the SHA-256 of `checkpoint.pt`. The weights are then read with
    `weights_only=True`. Returns the JSON entries plus `state` (the weights), `path`, `sha256` (of the
    weights) and `config_sha256` (of `config.json`, which pins the weights' hash in turn);
    raises `CheckpointError` (or `PairError` for a resolution mismatch).
    """
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ckpt = _read_meta(path)
    ckpt["config_sha256"] = file_hash(path.with_name(META_FILE))
    if kind is not None and ckpt["kind"] != kind:
        raise CheckpointError(f"checkpoint {path} holds a {ckpt['kind']!r} generator, expected {kind!r}")
    ckpt["path"] = str(path)
    if resolution is not None:
        check_resolution(ckpt, resolution, resolution)
    ckpt["sha256"] = file_hash(path)
    if ckpt["sha256"] != ckpt["weights_sha256"]:
        raise CheckpointError(f"checkpoint {path} has SHA-256 {ckpt['sha256'][:12]}..., but {META_FILE} beside it "
                              f"was written for {str(ckpt['weights_sha256'])[:12]}...; the weights were replaced "
                              f"or damaged: delete the folder and retrain")
    ckpt["state"] = _read_weights(path)
    return ckpt


def _read_meta(path: Path) -> dict:
    """The JSON half of a checkpoint: `config.json` beside `path`, checked for format and entries."""
    meta_path = path.with_name(META_FILE)
    if not meta_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {META_FILE} beside it; it is not a SupportForge "
                              f"generator checkpoint of format {FORMAT} (retrain it, e.g. with --force)")
    try:
        meta = json.loads(meta_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path} is not valid JSON ({err}); delete the folder and retrain") from None
    meta = meta if isinstance(meta, dict) else {}
    missing = [k for k in ("kind", "config", "provenance", "weights_sha256") if k not in meta]
    config = meta.get("config")
    if missing or meta.get("format") != FORMAT or not isinstance(config, dict) or "resolution" not in config:
        raise CheckpointError(f"{meta_path} is not a SupportForge generator checkpoint of format {FORMAT} "
                              f"(format {meta.get('format')!r}, missing entries {missing or 'config.resolution'}); "
                              f"retrain it, e.g. with --force")
    return meta


def _read_weights(path: Path) -> dict[str, dict[str, torch.Tensor]]:
    """`checkpoint.pt` as `{part: {name: tensor}}`, unpickled with `weights_only=True` (no code can run)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, TypeError, AttributeError) as err:
        raise CheckpointError(f"checkpoint {path} cannot be read as tensors only (weights_only=True): "
                              f"{_unpickling_reason(err)}; it is damaged or not a SupportForge checkpoint, and it "
                              f"was not run: delete it and retrain") from None
    parts_ok = isinstance(state, dict) and all(
        isinstance(part, dict) and all(isinstance(t, torch.Tensor) for t in part.values()) for part in state.values())
    if not parts_ok:
        raise CheckpointError(f"checkpoint {path} holds {type(state).__name__}, expected {{part: {{name: tensor}}}}")
    return state


def _unpickling_reason(err: Exception) -> str:
    """The useful line of a `torch.load` error: the refused global or opcode, not torch's advice to turn
    `weights_only` off."""
    lines = [ln.strip() for ln in str(err).splitlines() if ln.strip()]
    for k, line in enumerate(lines):
        if line.startswith("WeightsUnpickler error:"):
            rest = line.removeprefix("WeightsUnpickler error:").strip() or "".join(lines[k + 1:k + 2])
            return rest.split(". ")[0].rstrip(".") or type(err).__name__  # first sentence: what was refused
    return lines[0] if lines else type(err).__name__


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


__all__ = ["CheckpointError", "LeakageError", "PairError", "make_accelerator", "sample_device", "seeded_batches",
           "run_steps", "set_lr", "prepare_training_data", "save_checkpoint", "load_checkpoint", "check_resolution",
           "file_hash", "CHECKPOINT_FILE", "META_FILE"]
