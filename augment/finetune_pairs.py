"""What a generator is fine-tuned on for one class: its real support pairs, optionally with another source's pairs.

Three support slices teach a generator little about what an organ looks like (issue 12 item 3). With
`finetune_on = "learned"` in its config, the per-class fine-tune also learns from the learned source's set:
the supports warped onto the fold's unlabelled training volumes, image and mask consistent by construction.
The provenance says which rows are supports and which came from the set (`finetune_source`), and lists under
`derived` every slice those pairs were made from, so the leakage check sees all of them.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from augment.manifest import Provenance, SliceRef, check_no_leakage
from augment.pairs import PairError, as_pairs
from augment.synthesis import SyntheticSet, _support_refs

SUPPORT = "support"  # `finetune_source` of a row that is one of the class's real support pairs


def set_slices(manifest: dict) -> tuple[SliceRef, ...]:
    """Every slice a synthetic set depends on: its supports, each pair's target and appearance donor, and
    what its model learned from (the manifest's `training`), without repeats."""
    training = Provenance.from_dict(manifest["training"]) if manifest.get("training") else Provenance(fold=-1)
    refs = [SliceRef(**r) for r in manifest["support"]]
    for pair in manifest.get("pairs") or ():
        if "volume" in pair and "slice" in pair:
            refs.append(SliceRef(str(pair["volume"]), int(pair["slice"])))
        if pair.get("appearance_donor"):
            refs.append(SliceRef(str(pair["appearance_donor"][0]), int(pair["appearance_donor"][1])))
    refs += training.pretrain + training.finetune + training.derived
    return tuple(dict.fromkeys(refs))


def _row_refs(syn: SyntheticSet) -> tuple[SliceRef, ...]:
    """One ref per pair of a set: the slice it was mapped onto where it has one, else its source support."""
    pairs = syn.manifest.get("pairs") or [None] * len(syn)
    sources = syn.manifest.get("source") or [None] * len(syn)
    out = []
    for k, (pair, source) in enumerate(zip(pairs, sources)):
        if pair and "volume" in pair and "slice" in pair:
            out.append(SliceRef(str(pair["volume"]), int(pair["slice"])))
        elif source:
            out.append(SliceRef(str(source["volume"]), int(source["slice"])))
        else:
            raise PairError(f"pair {k} of the {syn.manifest.get('generator')!r} set names no slice it came from")
    return tuple(out)


def finetune_pairs(support: tuple[torch.Tensor, torch.Tensor, Sequence[SliceRef]], added: SyntheticSet | None, *,
                   fold: int, class_name: str, setting: int | None, query_volumes: Sequence[str]
                   ) -> tuple[tuple[torch.Tensor, torch.Tensor], Provenance]:
    """The class's support pairs `(S, 1, R, R)`, then the pairs of `added` (None: the supports alone), as
    `(images, masks)` `(S + N, 1, R, R)` with their provenance.

    `added` must be a set of this fold and class whose manifest names no query volume (else `PairError` or
    `LeakageError`, before anything is trained).
    """
    images, masks = as_pairs(support[:2], "support")
    refs = tuple(_support_refs(support[2], len(images)))
    queries = tuple(map(str, query_volumes))
    if added is None:
        return (images, masks), Provenance(fold=fold, class_name=class_name, setting=setting, finetune=refs,
                                           query_volumes=queries)
    name = added.manifest.get("generator")
    if (added.manifest.get("fold"), added.manifest.get("class_name")) != (fold, class_name):
        raise PairError(f"the {name!r} set to fine-tune on is for fold {added.manifest.get('fold')}, class "
                        f"{added.manifest.get('class_name')!r}, not fold {fold}, class {class_name!r}")
    extra_i, extra_m = as_pairs((added.images, added.masks), f"{name} pairs", resolution=images.shape[-1])
    rows = _row_refs(added)
    provenance = Provenance(fold=fold, class_name=class_name, setting=setting, finetune=refs + rows,
                            finetune_source=(SUPPORT,) * len(refs) + (str(name),) * len(rows),
                            derived=set_slices(added.manifest), query_volumes=queries,
                            notes=f"fine-tuned on {len(refs)} support pairs and {len(rows)} {name} pairs")
    check_no_leakage(provenance)  # every row, support, target, donor and model slice of the set
    return (torch.cat([images, extra_i]), torch.cat([masks, extra_m])), provenance  # (S + N, 1, R, R)
