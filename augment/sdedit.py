"""The SDEdit source (Meng et al. 2022): the DDPM as an appearance model for warped supports.

Takes the learned source's set of a class (supports warped onto unlabelled subjects, image and mask
consistent by construction) and the class's fine-tuned mask-conditioned DDPM; every image is noised to
`strength` of the diffusion trajectory and denoised for its own mask (`augment.ddpm.sdedit`), so anatomy
comes from the warp and texture from the DDPM. The masks are kept. The set's manifest records both inputs:
the DDPM checkpoint and its training, and every slice the warped pairs were made from.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

from augment import ddpm
from augment.finetune_pairs import set_slices
from augment.manifest import Provenance, validate_manifest
from augment.synthesis import SyntheticSet, _jsonable
from augment.training import load_checkpoint


def make_set(checkpoint: Path, pairs: SyntheticSet, *, seed: int, query_volumes: Sequence[str], strength: float,
             sampler: str | None = None, steps: int | None = None, batch_size: int | None = None) -> SyntheticSet:
    """`pairs` `(N, 1, R, R)` with each image remade by SDEdit at `strength` with the DDPM of `checkpoint`.

    Both inputs are checked against `query_volumes` before any work (`LeakageError`); a DDPM trained at
    another resolution than the pairs raises `PairError`. `sampler`, `steps`, `batch_size`: the DDPM's
    sampling keywords (None: those in its checkpoint).
    """
    # 1. check both inputs and their provenance
    validate_manifest(pairs.manifest, query_volumes)
    ckpt = load_checkpoint(checkpoint, kind=ddpm.KIND, resolution=pairs.masks.shape[-1])
    model = Provenance.from_dict(ckpt["provenance"])
    training = dataclasses.replace(model, derived=tuple(dict.fromkeys(model.derived + set_slices(pairs.manifest))))
    used_steps = steps or ckpt["config"]["sample_steps"]
    manifest = {"generator": "sdedit", "checkpoint": ckpt["path"], "checkpoint_sha256": ckpt["sha256"],
                "checkpoint_config_sha256": ckpt["config_sha256"], "seed": seed, "n": len(pairs),
                "fold": pairs.manifest.get("fold"), "class_name": pairs.manifest.get("class_name"),
                "support": pairs.manifest["support"], "training": training.to_dict(),
                "query_volumes": list(map(str, query_volumes)), "deform": None,
                "sampler": sampler or ckpt["config"]["sampler"], "steps": used_steps, "strength": strength,
                "denoising_steps": ddpm.sdedit_steps(used_steps, strength),
                "pairs_from": {k: pairs.manifest.get(k) for k in ("generator", "checkpoint_sha256", "seed", "n")}}
    validate_manifest(manifest, query_volumes)
    # 2. noise each warped image to `strength` and denoise it for its mask
    images, masks = ddpm.sdedit(ckpt, pairs.images, pairs.masks, strength=strength, seed=seed, steps=steps,
                                sampler=sampler, batch_size=batch_size)
    for key in ("source", "pairs", "dropped_fragments"):
        manifest[key] = pairs.manifest.get(key)
    return SyntheticSet(images.float(), masks.float(), _jsonable(manifest))
