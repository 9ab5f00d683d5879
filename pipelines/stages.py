"""Where `segment/` and `augment/` meet: one function per stage, each run through the stage cache.

Honesty rules the stages keep: a generator learns from the fold's training volumes (superpixel masks,
no labels) and the fold's support pairs only; every synthetic set's manifest is checked against the
fold's query volumes before use; segmenters never see a test-class label; every arm of a (fold, seed)
unit is fine-tuned for the same number of steps, from the same base model, on the same real supports,
and scored on the same query volumes.

The heavy modules (diffusers, accelerate, albumentations, scikit-image, matplotlib, the models) are
imported inside the functions that produce artifacts, so a run that finds everything cached starts fast.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from augment.config import DDPMConfig, DeformConfig, GANConfig
from augment.manifest import Provenance, refs, validate_manifest
from pipelines.config import CLASSICAL, ExperimentConfig, as_dict
from segment.config import SegmenterConfig, SuperpixelParams
from segment.protocol import (Fold, ep1_support_indices, evaluate, excluded_class_ids, make_folds,
                              training_slice_mask)
from segment.slices import PreparedData
from segment.volumes import DataError

GENERATORS = {"ddpm": DDPMConfig, "gan": GANConfig}
CHECKPOINT_FILE = "checkpoint.pt"  # a generator's checkpoint inside its stage folder
SAMPLING_FIELDS = ("sampler", "sample_steps", "sample_batch")  # read by synthesis, not by training
FINETUNE_FIELDS = ("finetune_steps", "finetune_lr", "finetune_lr_scale")  # read by the per-class fine-tune


def segmenter_config(cfg: ExperimentConfig, model: str, seed: int) -> SegmenterConfig:
    return SegmenterConfig.from_dict({**cfg.segment, "model": model, "resolution": cfg.data.resolution,
                                                "seed": seed, "cpu": cfg.run.cpu})


def generator_config(cfg: ExperimentConfig, name: str, seed: int):
    return GENERATORS[name](**{**cfg.generators[name], "resolution": cfg.data.resolution, "seed": seed, "cpu": cfg.run.cpu})


def exclusion_sets(data: PreparedData, classes: tuple[str, ...], setting: int) -> dict[str, tuple[int, ...]]:
    """Class -> the class ids training may not use as labels. Setting 1 pools every evaluated class, so
    one model per fold serves them all; Setting 2 keeps one set per exclusion group (the OR rule)."""
    if setting == 1:
        pooled = tuple(sorted({i for c in classes for i in excluded_class_ids(data.spec, c, 1)}))
        return {c: pooled for c in classes}
    return {c: tuple(sorted(excluded_class_ids(data.spec, c, 2))) for c in classes}


def support_pairs(data: PreparedData, fold: Fold, name: str) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The protocol's support pairs of a class: its EP1 slices of the fold's support volume, (3, 1, R, R)."""
    vol = data.volume(fold.support)
    idx = ep1_support_indices(vol.native_labels, data.spec.class_id(name))  # the protocol's slices
    images = torch.from_numpy(vol.images[idx][:, None].copy())
    masks = torch.from_numpy((vol.labels[idx] == data.spec.class_id(name))[:, None].astype(np.float32))
    return images, masks, idx


def superpixel_params(cfg: ExperimentConfig) -> SuperpixelParams:
    return SuperpixelParams(scale=segmenter_config(cfg, "prototype", 0).superpixel_scale)


def superpixel_stage(cfg: ExperimentConfig, data: PreparedData, runner) -> tuple[Path, str]:
    """Felzenszwalb superpixels of every slice (label-free), shared by segmenters and generators."""
    params = superpixel_params(cfg)

    def produce(folder: Path) -> None:
        from segment.superpixels import superpixels
        maps = superpixels(data, params=params, cache_dir=cfg.run.cache)
        (folder / "volumes.json").write_text(json.dumps({v: int(m.max()) for v, m in maps.items()}))

    return runner("superpixels", data.spec.name, as_dict(params), {"data": data.key}, produce)


def pretrain_pairs(cfg: ExperimentConfig, data: PreparedData, fold: Fold, excluded: tuple[int, ...], seed: int):
    """Unlabelled pool of a fold: each allowed training slice with one random superpixel as its mask."""
    from segment.superpixels import superpixels
    maps = superpixels(data, params=superpixel_params(cfg), cache_dir=cfg.run.cache, volume_ids=fold.train)
    rng = np.random.default_rng(seed)
    images, masks, used = [], [], []
    for vid in fold.train:
        vol = data.volume(vid)
        allowed = training_slice_mask(vol.labels, excluded, cfg.protocol.setting)
        for z in np.flatnonzero(allowed):
            ids, counts = np.unique(maps[vid][z], return_counts=True)
            keep = ids[(ids > 0) & (counts >= 0.002 * maps[vid][z].size) & (counts < 0.5 * maps[vid][z].size)]
            if not len(keep):
                continue
            images.append(vol.images[z])
            masks.append(maps[vid][z] == rng.choice(keep))
            used.append((vid, int(z)))
    pairs = (torch.from_numpy(np.stack(images)[:, None].copy()),
             torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)))
    return pairs, used


def generator_stage(cfg, data, fold, seed, name, class_name, excluded, sp_key, runner) -> tuple[Path, str]:
    """Pretrain one generator per fold on the unlabelled pool, then fine-tune it on a class's supports."""
    config = generator_config(cfg, name, seed)
    base_inputs = {"data": data.key, "superpixels": sp_key}
    train_fields = {k: v for k, v in as_dict(config).items() if k not in SAMPLING_FIELDS}
    pre_cfg = {"generator": name, "config": {k: v for k, v in train_fields.items() if k not in FINETUNE_FIELDS},
               "fold": as_dict(fold), "excluded": list(excluded), "setting": cfg.protocol.setting}

    def produce_pretrain(folder: Path) -> None:
        train_fn = _generator_train(name)
        pairs, used = pretrain_pairs(cfg, data, fold, excluded, seed)
        prov = Provenance(fold=fold.index, setting=cfg.protocol.setting, query_volumes=fold.queries,
                          pretrain=tuple(r for v, z in used for r in refs(v, [z])))
        train_fn(config, pretrain_pairs=pairs, provenance=prov, out_dir=folder)

    pre_path, pre_key = runner("generator-pretrain", f"{name} fold{fold.index} s{seed}", pre_cfg, base_inputs,
                               produce_pretrain)
    images, masks, idx = support_pairs(data, fold, class_name)

    def produce_finetune(folder: Path) -> None:
        train_fn = _generator_train(name)
        prov = Provenance(fold=fold.index, class_name=class_name, setting=cfg.protocol.setting,
                          finetune=refs(fold.support, idx), query_volumes=fold.queries)
        train_fn(config, finetune_pairs=(images, masks), provenance=prov,
                 out_dir=folder, init_checkpoint=pre_path / CHECKPOINT_FILE)

    return runner("generator", f"{name} fold{fold.index} s{seed} {class_name}",
                  {"class": class_name, "support_slices": idx, "config": train_fields},
                  {"pretrain": pre_key}, produce_finetune)


def _generator_train(name: str):
    from augment import ddpm, gan
    return {"ddpm": ddpm.train, "gan": gan.train}[name]


def synthesis_stage(cfg, data, fold, seed, source, class_name, gen_entry, runner) -> tuple[Path, str]:
    """`n_pairs` synthetic pairs of a class from one source; the manifest is checked for leakage."""
    images, masks, idx = support_pairs(data, fold, class_name)
    ids = refs(fold.support, idx)
    sampling = {} if source == CLASSICAL else {k: v for k, v in as_dict(generator_config(cfg, source, seed)).items()
                                               if k in SAMPLING_FIELDS}
    config = {"source": source, "class": class_name, "n": cfg.synthesis.n_pairs, "seed": seed,
              "support_slices": idx, "deform": as_dict(DeformConfig()), "fold": fold.index, "sampling": sampling}

    def produce(folder: Path) -> None:
        from augment.synthesis import classical_set, save_set, synthesize
        if source == CLASSICAL:
            syn = classical_set(images, masks, ids, n=cfg.synthesis.n_pairs, seed=seed, fold=fold.index,
                                class_name=class_name, query_volumes=fold.queries)
        else:
            gen_cfg = generator_config(cfg, source, seed)
            kwargs = {"steps": gen_cfg.sample_steps, "sampler": gen_cfg.sampler} if source == "ddpm" else {}
            syn = synthesize(gen_entry[0] / CHECKPOINT_FILE, images, masks, ids, n=cfg.synthesis.n_pairs, seed=seed,
                             query_volumes=fold.queries, **kwargs)
        save_set(syn, folder / "set")

    inputs = {"data": data.key} if gen_entry is None else {"generator": gen_entry[1]}
    path, key = runner("synthesis", f"{source} fold{fold.index} s{seed} {class_name}", config, inputs, produce)
    validate_manifest(json.loads((path / "set" / "manifest.json").read_text()), fold.queries)  # again, on the cache
    return path, key


def segmenter_stage(cfg, data, fold, seed, model, excluded, sp_key, runner) -> tuple[Path, str]:
    """The base segmenter of a fold: superpixel (and allowed supervised) episodes, no test-class label."""
    config = segmenter_config(cfg, model, seed)

    def produce(folder: Path) -> None:
        from segment import train as seg_train
        seg_train.train(config, data, fold, test_class_ids=excluded, setting=cfg.protocol.setting,
                        out_dir=folder, cache_dir=cfg.run.cache)

    return runner("segmenter", f"{model} fold{fold.index} s{seed}",
                  {"config": as_dict(config), "fold": as_dict(fold), "excluded": list(excluded),
                   "setting": cfg.protocol.setting}, {"data": data.key, "superpixels": sp_key}, produce)


def synthetic_pairs(data, fold, class_name, synth: dict[str, tuple[Path, str]], *, base_model: Path | None,
                    min_dice: float, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The arm's synthetic pairs of a class, (N, 1, R, R) each, at most `limit` per source.

    With `min_dice` > 0, only pairs on which the base segmenter, given the real supports alone, recovers the
    intended mask with at least that Dice are kept (the mask-consistency filter of the literature).
    """
    from augment.quality import mask_consistency
    from augment.synthesis import load_set
    from segment import train as seg_train
    from segment.predict import make_predictor
    sets = [load_set(path / "set") for path, _ in synth.values()]
    images = [syn.images[:limit] for syn in sets]
    masks = [syn.masks[:limit] for syn in sets]
    if not images:
        return torch.empty(0, 1, data.resolution, data.resolution), torch.empty(0, 1, data.resolution, data.resolution)
    images, masks = torch.cat(images), torch.cat(masks)
    if min_dice > 0 and base_model is not None:
        real_i, real_m, _ = support_pairs(data, fold, class_name)
        scores = mask_consistency(make_predictor(seg_train.load(base_model)), real_i, real_m, images, masks)
        keep = torch.tensor([d >= min_dice for d in scores["per_pair"]])
        images, masks = images[keep], masks[keep]
    return images, masks


def finetune_stage(cfg, data, fold, seed, base, class_name, synth, runner, label) -> tuple[Path, str]:
    """Fine-tune the base segmenter on the class's pool: real supports plus the arm's synthetic pairs."""
    base_model = base[0] / "model.pt"

    def produce(folder: Path) -> None:
        from segment import train as seg_train
        real_i, real_m, _ = support_pairs(data, fold, class_name)
        syn_i, syn_m = synthetic_pairs(data, fold, class_name, synth, base_model=base_model,
                                       min_dice=cfg.synthesis.filter_dice)
        (folder / "pool.json").write_text(json.dumps({"real": len(real_i), "synthetic": len(syn_i)}))
        seg_train.finetune(base_model, torch.cat([real_i, syn_i]), torch.cat([real_m, syn_m]), out_dir=folder,
                           steps=cfg.synthesis.finetune_steps, seed=seed)

    config = {"class": class_name, "steps": cfg.synthesis.finetune_steps, "seed": seed,
              "filter_dice": cfg.synthesis.filter_dice}
    return runner("finetune", label, config, {"base": base[1], **{s: k for s, (_, k) in synth.items()}}, produce)


def quality_stage(cfg, data, fold, seed, source, class_name, synth_entry, base, runner) -> tuple[Path, str]:
    """Why pairs help or not: does the real-data segmenter find the intended mask on them (mask
    consistency), do organ intensities match the real supports, and are they copies of the supports?"""

    def produce(folder: Path) -> None:
        from augment.quality import intensity_histogram_distance, mask_consistency, nearest_neighbour_distance
        from augment.synthesis import load_set
        from segment import train as seg_train
        from segment.predict import make_predictor
        real_i, real_m, _ = support_pairs(data, fold, class_name)
        syn = load_set(synth_entry[0] / "set")
        consistency = mask_consistency(make_predictor(seg_train.load(base[0] / "model.pt")), real_i, real_m,
                                       syn.images, syn.masks)
        quality = {"source": source, "class": class_name, "fold": fold.index, "seed": seed, "n": len(syn),
                   "mask_consistency": consistency["mean_dice"], "per_pair": consistency["per_pair"],
                   "histogram_distance": intensity_histogram_distance(real_i, syn.images, real_masks=real_m,
                                                                      synthetic_masks=syn.masks),
                   "nn_distance_to_supports": nearest_neighbour_distance(real_i, syn.images)["mean"]}
        (folder / "quality.json").write_text(json.dumps(quality, indent=2))

    return runner("quality", f"{source} fold{fold.index} s{seed} {class_name}", {},
                  {"synthesis": synth_entry[1], "base": base[1]}, produce)


def _to_shape(mask: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """(H, W) bool -> `shape` by nearest-exact sampling, the rule the working labels were made with."""
    if mask.shape == tuple(shape):
        return mask
    x = torch.from_numpy(mask.astype(np.float32))[None, None]  # (1, 1, H, W)
    return torch.nn.functional.interpolate(x, size=tuple(shape), mode="nearest-exact")[0, 0].numpy() > 0.5


def _overlay_hook(keep: list[dict], n_slices: int, wanted_query: dict[str, str], data: PreparedData):
    """Keep a few query slices (image, truth, prediction) of one query volume per class for the report.

    The prediction comes on the scoring grid (native by default); truth and prediction are drawn on the
    working image, so both are brought to its size.
    """

    def hook(fold_index: int, class_name: str, query_id: str, zs: np.ndarray, pred: np.ndarray) -> None:
        if wanted_query.setdefault(class_name, query_id) != query_id:
            return
        vol, cid = data.volume(query_id), data.spec.class_id(class_name)
        truth = vol.native_labels if pred.shape[1:] == vol.native_labels.shape[1:] else vol.labels
        with_truth = [i for i, z in enumerate(zs) if (truth[z] == cid).any()]
        shape = vol.images.shape[1:]
        for i in with_truth[len(with_truth) // 2:][:n_slices]:
            keep.append({"class": class_name, "query": query_id, "slice": int(zs[i]), "image": vol.images[zs[i]],
                         "truth": _to_shape(truth[zs[i]] == cid, shape), "pred": _to_shape(pred[i], shape)})

    return hook


def evaluate_stage(cfg, data, fold, seed, model, arm, protocol, tuned, bases, synth, classes,
                   runner) -> tuple[Path, str]:
    """Score one (model, arm) under one protocol; extra test-time supports come from the arm's pairs.

    Rows carry `dice` (native label grid, no post-processing: the headline) and `dice_post` (the same
    prediction after the largest 3D component of each query volume); see `segment.protocol`.
    """
    at_test = cfg.synthesis.at_test and any(synth.values())
    grid = "native"

    def predictor_for(fold_: Fold, class_name: str):
        from segment import train as seg_train
        from segment.predict import make_predictor
        net = seg_train.load(tuned[class_name][0] / "model.pt")
        extra = None
        if at_test:  # the protocol passes the real support slices itself
            extra = synthetic_pairs(data, fold_, class_name, synth[class_name], limit=cfg.synthesis.max_test_supports,
                                    base_model=bases[class_name][0] / "model.pt", min_dice=cfg.synthesis.filter_dice)
            extra = extra if len(extra[0]) else None
        return make_predictor(net, extra_supports=extra)  # probabilities; the evaluator post-processes

    def produce(folder: Path) -> None:
        panels: list[dict] = []
        res = evaluate(None, data, [fold], classes=classes, protocol=protocol, predictor_for_fold=predictor_for,
                       dice_grid=grid, on_prediction=_overlay_hook(panels, cfg.run.overlays, {}, data))
        rows = [{"protocol": protocol, "model": model, "arm": arm.name, "role": arm.role, "class": c, "fold": fold.index, "seed": seed,
                 "query": q, "dice": d, "dice_post": row["dice_post"][c][q]}
                for row in res["folds"] for c, per_q in row["dice"].items() for q, d in per_q.items()]
        (folder / "rows.json").write_text(json.dumps({"rows": rows, "skipped": res["skipped"], "dice_grid": grid,
                                                      "postprocess": False}, indent=2))
        np.savez_compressed(folder / "overlays.npz", **{f"{k}_{i}": np.asarray(p[k]) for i, p in enumerate(panels)
                                                         for k in ("image", "truth", "pred")})
        (folder / "overlays.json").write_text(json.dumps([{k: p[k] for k in ("class", "query", "slice")}
                                                          for p in panels]))

    inputs = {"data": data.key, **{f"tuned/{c}": k for c, (_, k) in tuned.items()},
              **({f"synth/{c}/{s}": k for c, per in synth.items() for s, (_, k) in per.items()} if at_test else {}),
              **({f"base/{c}": k for c, (_, k) in bases.items()} if at_test and cfg.synthesis.filter_dice > 0 else {})}
    config = {"arm": arm.name, "role": arm.role, "protocol": protocol, "classes": list(classes), "at_test": at_test,
              "max_test_supports": cfg.synthesis.max_test_supports, "dice_grid": grid, "dice_post": True,
              "filter_dice": cfg.synthesis.filter_dice if at_test else 0.0,
              "overlays": cfg.run.overlays}
    label = f"{model} {arm.name} {protocol} fold{fold.index} s{seed}"
    return runner("evaluate", label, config, inputs, produce)


def run_unit(cfg: ExperimentConfig, data: PreparedData, fold: Fold, seed: int, classes: tuple[str, ...],
             sp_key: str, runner) -> tuple[list[dict], dict]:
    """Every stage of one (fold, seed) unit; returns its Dice rows and the artifact paths for the report."""
    excl = exclusion_sets(data, classes, cfg.protocol.setting)
    # 1. synthetic pairs per source and class (generators first where a source needs one)
    synth: dict[tuple[str, str], tuple[Path, str]] = {}
    for source in cfg.sources:
        for c in classes:
            gen = None if source == CLASSICAL else generator_stage(cfg, data, fold, seed, source, c, excl[c],
                                                                   sp_key, runner)
            synth[source, c] = synthesis_stage(cfg, data, fold, seed, source, c, gen, runner)
    # 2. per model: base segmenter per exclusion set, fine-tuned per arm and class, then scored
    rows, evals, quality = [], [], []
    for model in cfg.models:
        bases = {e: segmenter_stage(cfg, data, fold, seed, model, e, sp_key, runner) for e in sorted(set(excl.values()))}
        if model == cfg.models[0]:  # 3. quality of every synthetic set, judged by the first model's base segmenter
            quality += [str(quality_stage(cfg, data, fold, seed, s, c, entry, bases[excl[c]], runner)[0])
                        for (s, c), entry in synth.items()]
        for arm in cfg.arms:
            acfg = replace(cfg, synthesis=arm.synthesis(cfg.synthesis))  # the arm's named overrides
            arm_synth = {c: {s: synth[s, c] for s in arm.sources} for c in classes}
            tuned = {c: (finetune_stage(acfg, data, fold, seed, bases[excl[c]], c, arm_synth[c], runner,
                                        f"{model} {arm.name} fold{fold.index} s{seed} {c}")
                         if acfg.synthesis.in_training else bases[excl[c]]) for c in classes}
            pools = {c: _synthetic_pool(tuned[c][0]) if arm.sources and acfg.synthesis.in_training else None
                     for c in classes}
            for protocol in cfg.protocol.protocols:
                path, key = evaluate_stage(acfg, data, fold, seed, model, arm, protocol, tuned,
                                           {c: bases[excl[c]] for c in classes}, arm_synth, classes, runner)
                rows += [r | {"synthetic_pairs": pools[r["class"]]}
                         for r in json.loads((path / "rows.json").read_text())["rows"]]
                evals.append({"model": model, "arm": arm.name, "protocol": protocol, "path": str(path), "key": key,
                              "fold": fold.index, "seed": seed})
    return rows, {"synth": {f"{s}|{c}": str(p) for (s, c), (p, _) in synth.items()}, "evals": evals,
                  "quality": quality, "fold": fold.index, "seed": seed}


def _synthetic_pool(finetune_dir: Path) -> int:
    """How many synthetic pairs the filter kept for a fine-tune (its pool.json)."""
    return int(json.loads((finetune_dir / "pool.json").read_text())["synthetic"])


def _overlay_panels(evals: list[dict], model: str, protocol: str) -> list[dict]:
    """Overlay panels of the first (fold, seed) unit: one row per arm, one panel per class and slice."""
    panels = []
    first = (evals[0]["fold"], evals[0]["seed"]) if evals else None
    for e in (e for e in evals if e["model"] == model and e["protocol"] == protocol and (e["fold"], e["seed"]) == first):
        meta = json.loads((Path(e["path"]) / "overlays.json").read_text())
        with np.load(Path(e["path"]) / "overlays.npz") as z:
            for i, m in enumerate(meta):
                panels.append({"image": z[f"image_{i}"], "truth": z[f"truth_{i}"], "pred": z[f"pred_{i}"],
                               "title": f"{e['arm']} · {m['class']} · vol {m['query']} z{m['slice']}"})
    return panels


def dice_scoring(cfg: ExperimentConfig, rows: list[dict], evals: list[dict]):
    """How the rows' headline `dice` was scored, from the rows or their rows.json; working grid by default.

    Rows that carry `dice_post` have a headline without post-processing; older rows were scored with
    `[protocol] postprocess`.
    """
    from pipelines.report import DiceScoring
    metas = [json.loads((Path(e["path"]) / "rows.json").read_text()) for e in evals]
    grids = {r["dice_grid"] for r in rows if "dice_grid" in r} | {m["dice_grid"] for m in metas if "dice_grid" in m}
    if len(grids) > 1:
        raise DataError(f"rows scored on different Dice grids {sorted(grids)}: one report cannot mix them")
    posts = {m["postprocess"] for m in metas if "postprocess" in m}
    if any("dice_post" in r for r in rows):
        posts = {False}
    postprocess = posts.pop() if len(posts) == 1 else getattr(cfg.protocol, "postprocess", False)
    return DiceScoring(grid=grids.pop() if grids else "working", postprocess=postprocess)


def report_stage(cfg: ExperimentConfig, data: PreparedData, rows: list[dict], extras: list[dict], runner,
                 failed_units: list[dict] = ()) -> Path:
    """Statistics, figures and report.md of the whole experiment, cached on the keys of what it reads.
    `failed_units` (fold, seed, log tail) have no rows: results.json lists them; nothing is averaged over them."""
    evals = [e for x in extras for e in x["evals"]]
    synth = {k: v for x in extras if x["fold"] == extras[0]["fold"] and x["seed"] == extras[0]["seed"]
             for k, v in x["synth"].items()}

    def produce(folder: Path) -> None:
        from augment.synthesis import load_set, save_grid
        from pipelines import report
        figures = {}
        for protocol in cfg.protocol.protocols:
            for model in cfg.models:
                name = f"overlays_{model}_{protocol}.png"
                report.overlay_figure(_overlay_panels(evals, model, protocol), folder / name,
                                      cols=len(rows_classes(rows)) * cfg.run.overlays)
                figures[f"Query overlays, {model}, {protocol}: truth green, prediction red"] = name
        first_fold = make_folds(data.ids, data.spec.n_folds)[extras[0]["fold"]]
        for c in dict.fromkeys(k.split("|")[1] for k in synth):
            images, masks, _ = support_pairs(data, first_fold, c)
            grid = {"real supports": (images, masks)}
            grid |= {s: load_set(Path(p) / "set") for s_c, p in synth.items() for s in [s_c.split("|")[0]]
                     if s_c.endswith(f"|{c}")}
            name = f"pairs_{c}.png"
            save_grid(grid, folder / name, title=f"{c}: real supports and synthetic pairs (fold {extras[0]['fold']})")
            figures[f"Synthetic pairs, {c}"] = name
        context = {"experiment": cfg.name, "dataset": data.spec.to_dict(), "data": str(data.source),
                   "data_key": data.key, "resolution": data.resolution, "config": as_dict(cfg),
                   "versions": _versions(), "units": [(x["fold"], x["seed"]) for x in extras],
                   "failed_units": list(failed_units)}
        quality = [json.loads((Path(q) / "quality.json").read_text()) for x in extras for q in x["quality"]]
        threshold = max([a.synthesis(cfg.synthesis).filter_dice for a in cfg.arms] + [0.0]) or 0.5
        report.build_report(folder, title=f"SupportForge ablation: {cfg.name}", rows=rows,
                            arms=[a.name for a in cfg.arms], context=context, quality=quality, figures=figures,
                            scoring=dice_scoring(cfg, rows, evals), filter_dice=threshold)

    inputs = {f"eval/{i}": e["key"] for i, e in enumerate(evals)}
    inputs |= {f"quality/{i}": Path(q).name for i, q in enumerate(q for x in extras for q in x["quality"])}
    failed = {"failed_units": [(f["fold"], f["seed"]) for f in failed_units]} if failed_units else {}
    path, _ = runner("report", cfg.name, {"config": as_dict(cfg), **failed}, inputs, produce)
    return path


def rows_classes(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(r["class"] for r in rows))


def _versions() -> dict:
    import accelerate
    import diffusers
    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "accelerate": accelerate.__version__,
            "numpy": np.__version__}


def publish(report_dir: Path, out: Path) -> None:
    """Copy the report's files into the run folder (the cache keeps the original)."""
    out.mkdir(parents=True, exist_ok=True)
    for f in report_dir.iterdir():
        if f.is_file() and f.name != "stage.json":
            shutil.copy2(f, out / f.name)
