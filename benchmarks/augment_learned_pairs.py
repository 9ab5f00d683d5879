"""Benchmark: learned-transform pairs (Zhao et al. 2019) on one fold; joins `augment` and `segment`.

1. Trains the registration model (`augment.registration`) on the fold's training volumes, images only.
2. For each class, registers the 3 EP1 support slices onto every training volume, checks each candidate
   (label-free: folding, LNCC, mask area and shape) and draws 12 pairs with another subject's appearance
   (`augment.warped_pairs.learned_pairs` in two steps, so the candidates can be measured).
3. Measures (a) the label accuracy of the transforms on the training volumes: Dice of the warped support
   mask against the TRUE mask of the slice the model picked (labels used for this measurement only),
   next to no warp and affine only at that slice, the same warp at relative z, and at the organ-relative
   position (which uses labels; an upper bound on correspondence); (b) the share of pairs passing the
   checks; (c) wall time; (d) a PNG grid per class; optionally (e) the downstream EP1 Dice of the
   prototype net fine-tuned on real supports alone / + classical / + learned / + oracle pairs (one fold,
   one seed).
Writes benchmarks/results/augment_learned_pairs{_tag}.json and .md and learned_pairs_grid_<class>.png.

    .venv/bin/python benchmarks/augment_learned_pairs.py                       # CHAOS fold 0, 128 px
    .venv/bin/python benchmarks/augment_learned_pairs.py --phantom --out /tmp/x  # quick phantom mode
    .venv/bin/python benchmarks/augment_learned_pairs.py --finetune --base-checkpoint runs/.../model.pt
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.appearance import HistogramAppearance  # noqa: E402
from augment.masks import classical_pairs  # noqa: E402
from augment.registration import SCALINGS, RegistrationConfig, load_registration, train_registration  # noqa: E402
from augment.synthesis import save_grid  # noqa: E402
from augment.warped_pairs import (PairChecks, fit_z_maps, oracle_pairs, register_candidates,  # noqa: E402
                                  select_pairs, warp_pair)
from segment.data.phantom import write_phantom  # noqa: E402
from segment.data.protocol import ep1_support_indices, make_folds  # noqa: E402
from segment.data.slices import prepare  # noqa: E402
from segment.data.volumes import load_spec  # noqa: E402

REFERENCE = {"no warp, same relative z": 33.9, "bbox affine + TV-L1, same relative z": 46.8,
             "VoxelMorph 2D, same relative z": 40.7, "no warp, organ-relative position": 49.9,
             "bbox affine + TV-L1, organ-relative position": 65.9}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--spec", default="abd_mri")
    p.add_argument("--phantom", action="store_true", help="quick mode: 10 phantom volumes at 64 px, tiny model")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=400, help="registration training steps")
    p.add_argument("--pool", type=int, default=256, help="registration training slice pairs")
    p.add_argument("--bending-weight", type=float, default=0.1, help="BendingEnergyLoss weight of the registration")
    p.add_argument("--scaling", choices=SCALINGS, default="axes", help="affine pre-alignment scaling")
    p.add_argument("--max-scale", type=float, default=1.5, help="affine body scaling clipped to [1/x, x]")
    p.add_argument("--n", type=int, default=12, help="pairs per class")
    p.add_argument("--correspondence", choices=["volume", "slice"], default="volume",
                   help="volume: one z line fitted between whole volumes (fit_z_map); slice: best slice per volume")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "augment_learned_pairs"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--retrain", action="store_true", help="retrain the registration even if a checkpoint exists")
    p.add_argument("--finetune", action="store_true", help="(e) downstream EP1 of fine-tuned prototype nets")
    p.add_argument("--base-checkpoint", default="", help="trained prototype model.pt for (e); default: train one")
    p.add_argument("--finetune-steps", type=int, default=300)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    data = Path(args.data)
    args.data = str(data if data.is_absolute() else (ROOT / data).resolve())
    return args


def load_data(args):
    """(PreparedData, fold) of CHAOS, or of a fresh phantom in quick mode."""
    if args.phantom:
        folder = Path(tempfile.mkdtemp(prefix="phantom_")) / "data"
        write_phantom(folder, n_volumes=10, size=64, depth=20, seed=args.seed, n_folds=5)
        spec, args.resolution = load_spec(str(folder / "dataset.toml")), 64
        data = prepare(spec, folder, resolution=64, cache_dir=folder.parent / "cache")
    else:
        spec = load_spec(args.spec)
        data = prepare(spec, args.data, resolution=args.resolution, cache_dir=args.cache)
    return data, make_folds(data.ids, data.spec.n_folds)[args.fold]


def registration_config(args) -> RegistrationConfig:
    if args.phantom:
        return RegistrationConfig(resolution=64, channels=(8, 16, 16, 16), final_channels=(8,), steps=40,
                                  pool_size=32, seed=args.seed, scaling=args.scaling, max_scale=args.max_scale)
    return RegistrationConfig(resolution=args.resolution, steps=args.steps, pool_size=args.pool, seed=args.seed,
                              bending_weight=args.bending_weight, scaling=args.scaling, max_scale=args.max_scale)


def get_model(args, data, fold, config):
    """Train (or reuse) the fold's registration model; returns (model, seconds, checkpoint folder)."""
    changed = {k: v for k, v in asdict(config).items() if v != getattr(RegistrationConfig, k)}
    name = "registration" + ("-" + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:8]
                              if changed else "")
    out = Path(args.runs) / f"{data.spec.name}-{data.key}" / f"fold{fold.index}" / name
    meta = out / "config.json"
    t0 = time.time()
    if args.phantom or args.retrain or not meta.is_file() or json.loads(meta.read_text())["config"] != json.loads(
            json.dumps(asdict(config))):
        volumes = {vid: data.volume(vid).images for vid in fold.train}  # images only
        train_registration(volumes, config, out, fold=fold.index, query_volumes=fold.queries)
    return load_registration(out, resolution=data.resolution), round(time.time() - t0, 1), out


def dice2d(a: torch.Tensor, b: np.ndarray) -> float:
    a, b = a.numpy() > 0.5, b > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def label_accuracy(model, candidates, support_masks, support_rel, data, fold, cid) -> list[dict]:
    """Dice of each candidate's warped mask against the true mask at its slice (labels: measurement only)."""
    rows = []
    for s, cands in enumerate(candidates):
        for c in cands:
            vol = data.volume(c["volume"])
            truth = vol.labels == cid                                       # (Z, H, W)
            z = c["slice"]
            _, affine_mask = warp_pair(torch.zeros_like(c["mask"]), support_masks[s, 0], c["registration"].affine_ddf)
            row = {"support": s, "volume": c["volume"], "passed": c["problem"] is None, "slice": z,
                   "no_warp": dice2d(support_masks[s, 0], truth[z]), "affine": dice2d(affine_mask, truth[z]),
                   "learned": dice2d(c["mask"], truth[z])}
            # the same model at fixed correspondences: relative z of the volume, organ-relative (uses labels)
            z_rel = int(round(support_rel[s]["volume"] * (len(vol.images) - 1)))
            zs = np.flatnonzero(truth.any(axis=(1, 2)))
            z_org = int(zs[0] + round(support_rel[s]["organ"] * (zs[-1] - zs[0]))) if len(zs) else z_rel
            sup = c["support_image"]
            for key, zz in (("relative_z", z_rel), ("organ_relative", z_org)):
                reg = model.register(sup, torch.from_numpy(vol.images), slices=np.array([zz]))
                _, m = warp_pair(sup, support_masks[s, 0], reg.ddf)
                row[f"{key}_learned"] = dice2d(m, truth[zz])
                row[f"{key}_no_warp"] = dice2d(support_masks[s, 0], truth[zz])
            rows.append(row)
    return rows


def summarise_accuracy(rows: list[dict]) -> dict:
    keys = ["no_warp", "affine", "learned", "relative_z_no_warp", "relative_z_learned", "organ_relative_no_warp",
            "organ_relative_learned"]
    out = {}
    for name, subset in (("all candidates", rows), ("passing candidates", [r for r in rows if r["passed"]])):
        out[name] = {"n": len(subset), **{k: round(100 * float(np.mean([r[k] for r in subset])), 1) if subset else None
                                          for k in keys}}
    return out


def downstream(args, data, fold, pools: dict, base: str) -> dict:
    """(e) EP1 Dice per class and arm: the base prototype net fine-tuned on each pool (one fold, one seed)."""
    from segment.predict import make_predictor
    from segment.data.protocol import evaluate
    from segment.train import SegmenterConfig, finetune, load, train

    runs = Path(args.runs) / f"{data.spec.name}-{data.key}" / f"fold{fold.index}"
    if not base:
        cfg = SegmenterConfig(resolution=data.resolution, cpu=True, checkpoint_every=250)
        base = str(train(cfg, data, fold, test_class_ids=tuple(range(1, len(data.spec.classes) + 1)), setting=1,
                         out_dir=runs / "prototype-base", cache_dir=args.cache))
    out = {"base_checkpoint": base, "finetune_steps": args.finetune_steps, "seed": args.seed, "arms": {}}
    for arm in next(iter(pools.values())):
        per_class = {}
        for name, arm_pools in pools.items():
            images, masks = arm_pools[arm]
            ckpt = finetune(base, images, masks, out_dir=runs / f"finetune-{arm}-{name}", steps=args.finetune_steps,
                            seed=args.seed)
            res = evaluate(make_predictor(load(ckpt)), data, [fold], classes=[name], protocol="EP1")
            per_class[name] = round(100 * res["per_class"][name], 1)
        out["arms"][arm] = {"per_class": per_class, "mean": round(float(np.mean(list(per_class.values()))), 1)}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    t_start = time.time()
    data, fold = load_data(args)
    config = registration_config(args)
    model, train_seconds, ckpt = get_model(args, data, fold, config)
    volumes = {vid: torch.from_numpy(data.volume(vid).images) for vid in fold.train}
    support = data.volume(fold.support)
    checks, appearance = PairChecks(), HistogramAppearance()
    result = {"fold": fold.index, "support_volume": fold.support, "train_volumes": list(fold.train),
              "resolution": data.resolution, "dataset": data.spec.name, "registration_config": asdict(config),
              "checks": asdict(checks), "registration_checkpoint": str(ckpt.relative_to(ROOT)) if ckpt.is_relative_to(ROOT)
              else str(ckpt), "seconds": {"registration_training": train_seconds}, "classes": {}, "reference": REFERENCE}
    t0 = time.time()
    z_maps = fit_z_maps(support.images, volumes, model) if args.correspondence == "volume" else None
    result["seconds"]["z_maps"] = round(time.time() - t0, 1)
    result["correspondence"] = args.correspondence
    result["z_maps"] = z_maps
    pools, accuracy_rows = {}, []
    out_dir = Path(args.out)
    for name in data.spec.classes:
        cid = data.spec.class_id(name)
        idx = ep1_support_indices(support.native_labels, cid)
        s_img = torch.from_numpy(support.images[idx])[:, None]                       # (3, 1, R, R)
        s_mask = torch.from_numpy((support.labels[idx] == cid).astype(np.float32))[:, None]
        zs = np.flatnonzero((support.labels == cid).any(axis=(1, 2)))
        rel = [{"volume": z / (len(support.images) - 1), "organ": (z - zs[0]) / max(1, zs[-1] - zs[0])} for z in idx]
        t0 = time.time()
        candidates = register_candidates(s_img, s_mask, volumes, model, checks, z_maps=z_maps,
                                         support_slices=None if z_maps is None else idx)
        images, masks, info = select_pairs(candidates, volumes, appearance, args.n, args.seed, checks=checks)
        synth_seconds = round(time.time() - t0, 1)
        for s, cands in enumerate(candidates):
            for c in cands:
                c["support_image"] = s_img[s, 0]
        rows = label_accuracy(model, candidates, s_mask, rel, data, fold, cid)
        chosen = {(p["support"], p["volume"]) for p in info["pairs"]}
        accuracy_rows += rows
        result["classes"][name] = {"support_slices": [int(i) for i in idx], "synthesis_seconds": synth_seconds,
                                   "share_passed": round(info["share_passed"], 3), "n_candidates": info["n_candidates"],
                                   "label_accuracy": summarise_accuracy(rows),
                                   "label_accuracy_selected": round(100 * float(np.mean(
                                       [r["learned"] for r in rows if (r["support"], r["volume"]) in chosen])), 1),
                                   "pairs": info["pairs"],
                                   "failures": [c for c in info["candidates"] if c["problem"] is not None]}
        save_grid({"supports": (s_img, s_mask), "pairs 1-6": (images[:6], masks[:6]),
                   "pairs 7-12": (images[6:12], masks[6:12])},
                  out_dir / f"learned_pairs_grid_{name}{args.tag}.png", n=6,
                  title=f"{data.spec.name} fold {fold.index} {name}: supports and learned-transform pairs")
        c_img, c_mask, _, _ = classical_pairs(s_img, s_mask, args.n, seed=args.seed)
        train_ids = list(fold.train)
        o_img, o_mask, _ = oracle_pairs([data.volume(v).images for v in train_ids],
                                        [data.volume(v).labels == cid for v in train_ids], args.n, seed=args.seed)
        pools[name] = {"real": (s_img, s_mask), "classical": (torch.cat([s_img, c_img]), torch.cat([s_mask, c_mask])),
                       "learned": (torch.cat([s_img, images]), torch.cat([s_mask, masks])),
                       "oracle (diagnostic)": (torch.cat([s_img, o_img]), torch.cat([s_mask, o_mask.float()]))}
        print(name, json.dumps(result["classes"][name]["label_accuracy"]), flush=True)
    result["label_accuracy"] = summarise_accuracy(accuracy_rows)
    result["share_passed"] = round(float(np.mean([r["passed"] for r in accuracy_rows])), 3)
    if args.finetune:
        result["downstream"] = downstream(args, data, fold, pools, args.base_checkpoint)
    result["seconds"]["total"] = round(time.time() - t_start, 1)
    write(result, out_dir, args.tag, args.phantom)
    return result


def write(result: dict, out_dir: Path, tag: str, phantom: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"augment_learned_pairs{tag}.json").write_text(json.dumps(result, indent=2))
    acc = result["label_accuracy"]
    lines = [f"# Learned-transform pairs: {result['dataset']} fold {result['fold']}, {result['resolution']} px"
             + (" (phantom)" if phantom else ""), "", f"Slice correspondence: {result['correspondence']}.", "",
             "Label accuracy of the transforms on the training volumes: Dice (%) of each warped support mask "
             "against the true mask of the target slice (labels used only for this measurement).", "",
             "| candidates | n | no warp | affine | affine + VoxelMorph | rel. z: no warp | rel. z: learned | "
             "organ-rel.: no warp | organ-rel.: learned |", "|---|---|---|---|---|---|---|---|---|"]
    for name, a in acc.items():
        lines.append(f"| {name} | {a['n']} | {a['no_warp']} | {a['affine']} | {a['learned']} | {a['relative_z_no_warp']} "
                     f"| {a['relative_z_learned']} | {a['organ_relative_no_warp']} | {a['organ_relative_learned']} |")
    lines += ["", "The first three columns use the slice the model found; 'rel. z' forces the slice at the "
              "support's relative z of the volume, 'organ-rel.' the slice at its relative position in the organ's "
              "range (uses labels: an upper bound on correspondence).", "",
              "REFERENCE.md (48 pairs): " + "; ".join(f"{k} {v}" for k, v in result["reference"].items()), "",
              "| class | share passed | selected pairs' mask Dice | synthesis s |", "|---|---|---|---|"]
    for name, c in result["classes"].items():
        lines.append(f"| {name} | {c['share_passed']} | {c['label_accuracy_selected']} | {c['synthesis_seconds']} |")
    lines += ["", f"Share of candidates passing the checks: {result['share_passed']}. "
              f"Registration training: {result['seconds']['registration_training']} s; total {result['seconds']['total']} s."]
    if "downstream" in result:
        d = result["downstream"]
        lines += ["", f"Downstream EP1 Dice (%), prototype net fine-tuned {d['finetune_steps']} steps, ONE fold, one "
                  "seed; oracle is a diagnostic ceiling that Setting 1 forbids.", "",
                  "| arm | " + " | ".join(next(iter(d["arms"].values()))["per_class"]) + " | mean |",
                  "|---|" + "---|" * (len(next(iter(d["arms"].values()))["per_class"]) + 1)]
        for arm, a in d["arms"].items():
            lines.append(f"| {arm} | " + " | ".join(str(v) for v in a["per_class"].values()) + f" | {a['mean']} |")
    (out_dir / f"augment_learned_pairs{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
