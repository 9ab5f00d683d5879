"""The learned-transform source of the pipeline (Zhao et al. 2019): `train` and `make_set` for `augment.registry`.

Training: a 2D registration model (`augment.registration`) per fold, on the IMAGES of the fold's training
volumes; no label is read, and a query volume among them raises `LeakageError` before anything is written.
Sampling: each EP1 support slice of a class and its mask are warped onto those volumes by the model
(`augment.warped_pairs.learned_pairs`, slice correspondence fitted between the support volume and each
target, images only), every candidate passes the label-free checks, and, with `appearance`, another
subject's appearance is applied. The set's manifest lists every volume the model and the pairs used, and
the checks' outcome.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from augment.appearance import AppearanceConfig, HistogramAppearance
from augment.config import LearnedConfig
from augment.manifest import Provenance, SliceRef, refs, validate_manifest
from augment.pairs import PairError
from augment.registration import KIND, RegistrationConfig, RegistrationModel, train_registration
from augment.synthesis import SyntheticSet, _jsonable, _support_refs
from augment.training import load_checkpoint
from augment.warped_pairs import PairChecks, learned_pairs


def registration_config(config: LearnedConfig) -> RegistrationConfig:
    """The registration model's part of a `LearnedConfig`."""
    return RegistrationConfig(resolution=config.resolution, channels=config.channels,
                              final_channels=config.final_channels, integration_steps=config.integration_steps,
                              bending_weight=config.bending_weight, steps=config.steps, batch_size=config.batch_size,
                              lr=config.lr, pool_size=config.pool_size, candidates=config.candidates, seed=config.seed)


def train(config: LearnedConfig, *, volumes: Mapping[str, np.ndarray], fold: int, query_volumes: Sequence[str],
          out_dir: Path) -> Path:
    """The fold's registration model from `volumes` {id: `(Z, H, W)` image}; images only, never labels.
    Trained on the GPU when `config.cpu` is false and there is one (as the generators and segmenters are)."""
    return train_registration(volumes, registration_config(config), out_dir, fold=fold,
                              query_volumes=tuple(map(str, query_volumes)), cpu=config.cpu)


def _load(checkpoint: Path, resolution: int, where: str) -> tuple[RegistrationModel, dict]:
    """The model of a checkpoint, refused (one line naming `where`) when trained at another resolution."""
    try:
        ckpt = load_checkpoint(Path(checkpoint), kind=KIND, resolution=resolution)
    except PairError as err:
        raise PairError(f"{where}: {err}") from None
    model = RegistrationModel(RegistrationConfig.from_dict(ckpt["config"]))
    model.net.load_state_dict(ckpt["state"]["net"])
    return model.eval(), ckpt


def registration_manifest(source: str, ckpt: dict, support_refs: Sequence[SliceRef], volumes: Mapping[str, np.ndarray],
                          *, n: int, seed: int, fold: int, class_name: str, query_volumes: Sequence[str],
                          described: str) -> dict:
    """The manifest of a set made with a registration model (`ckpt`): the model, the supports, and every slice
    of the unlabelled `volumes` it may draw on, checked against the query volumes (`LeakageError`)."""
    training = Provenance.from_dict(ckpt["provenance"])
    targets = tuple(r for vid, v in volumes.items() for r in refs(str(vid), range(len(v))))
    provenance = Provenance(fold=fold, class_name=class_name, pretrain=training.pretrain + targets,
                            query_volumes=tuple(map(str, query_volumes)),
                            notes=f"{described}: images of the training volumes only, no labels")
    manifest = {"generator": source, "checkpoint": ckpt["path"], "checkpoint_sha256": ckpt["sha256"],
                "checkpoint_config_sha256": ckpt["config_sha256"], "seed": seed, "n": n, "fold": fold,
                "class_name": class_name, "support": [dataclasses.asdict(r) for r in support_refs],
                "training": provenance.to_dict(), "unlabelled_volumes": sorted(map(str, volumes)),
                "query_volumes": list(map(str, query_volumes)), "deform": None, "sampler": "registration", "steps": 1}
    validate_manifest(manifest, query_volumes)
    return manifest


def make_set(checkpoint: Path | None, *, support: tuple[torch.Tensor, torch.Tensor, Sequence[SliceRef]],
             support_volume: np.ndarray, support_slices: Sequence[int], volumes: Mapping[str, np.ndarray],
             labels: Mapping[str, np.ndarray] | None, n: int, seed: int, fold: int, class_name: str,
             query_volumes: Sequence[str], z_window: int, max_folded_share: float, min_similarity: float,
             min_area_ratio: float, max_area_ratio: float, min_fragment_px: int, appearance: bool,
             appearance_regions: str) -> SyntheticSet:
    """`n` pairs of a class: its support slices `(S, 1, R, R)` warped onto the unlabelled `volumes`.

    `labels` must be None: this source never reads a label of the training volumes. A support all of whose
    warps fail the checks (e.g. a mask empty after warping) gives no pair and is listed in the manifest's
    checks; a resolution the model was not trained at, or no support with a passing warp, raises `PairError`
    in one line naming the pairs.
    """
    if labels is not None:
        raise PairError("the learned source reads no label of the training volumes; pass labels=None")
    images, masks, ids = support
    refs_ = _support_refs(ids, len(images))
    where = f"learned pairs, fold {fold}, class {class_name}"
    model, ckpt = _load(checkpoint, images.shape[-1], where)
    manifest = registration_manifest("learned", ckpt, refs_, volumes, n=n, seed=seed, fold=fold,
                                     class_name=class_name, query_volumes=query_volumes, described="learned transforms")
    checks = PairChecks(max_folded_share=max_folded_share, min_similarity=min_similarity,
                        min_area_ratio=min_area_ratio, max_area_ratio=max_area_ratio, min_fragment_px=min_fragment_px)
    try:
        look = HistogramAppearance(AppearanceConfig(regions=appearance_regions)) if appearance else None
        out_i, out_m, info = learned_pairs(images, masks, volumes, model, look,
                                           n, seed, checks=checks, support_volume=support_volume,
                                           support_slices=list(support_slices), z_window=z_window)
    except PairError as err:
        raise PairError(f"{where}: {err}") from None
    manifest["source"] = [dataclasses.asdict(refs_[p["support"]]) for p in info["pairs"]]
    manifest["dropped_fragments"] = [0] * len(refs_)
    manifest["checks"] = {"thresholds": info["checks"], "appearance": appearance,
                          "appearance_regions": appearance_regions if appearance else None,
                          "n_candidates": info["n_candidates"],
                          "n_passed": info["n_passed"], "share_passed": info["share_passed"],
                          "dropped": info["n_candidates"] - info["n_passed"],
                          "supports_without_pairs": info["supports_without_pairs"], "candidates": info["candidates"]}
    manifest["pairs"] = info["pairs"]
    return SyntheticSet(out_i.float(), out_m.float(), _jsonable(manifest))
