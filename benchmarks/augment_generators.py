"""Benchmark for issue 4: DDPM and GAN support-set generators on Abd-MRI (CHAOS T2), one fold, 4 organs.

1. Throughput at the working resolution on this machine: the few-step sampler (DPM-Solver++ by default)
   against diffusers' `DDPMPipeline` at its default 1000 steps on the same trained model, side by side.
2. Training budget (CPU profile): both generators pretrained once on the fold's unlabelled training pool
   (images of the training volumes, conditioned on one Felzenszwalb superpixel per slice: no label is used),
   then fine-tuned per organ on the 3 EP1 support pairs of the fold's support volume (Setting 1).
   No query volume of the fold is used; every checkpoint and set carries the manifest that says so.
3. Per organ: 32 synthetic pairs per generator for deformed support masks, and the classical control
   (same deformations on support image + mask). Quality against the fold's real query slices of the organ:
   Frechet distance of features from an encoder trained here on the training pool (no downloaded weights),
   intensity-histogram distances, mask consistency (a pixel classifier fitted on the 3 real supports only),
   nearest-neighbour distance to the supports (memorisation). PNG grids per organ.

Writes benchmarks/results/augment_generators{tag}.json and .md.

    .venv/bin/python benchmarks/augment_generators.py                    # CPU profile, fold 0
    .venv/bin/python benchmarks/augment_generators.py --smoke --tag smoke  # a 2-minute end-to-end check
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage
from sklearn.linear_model import LogisticRegression

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment import ddpm, gan  # noqa: E402
from augment.manifest import Provenance, SliceRef, refs  # noqa: E402
from augment.masks import DeformConfig  # noqa: E402
from augment.quality import (EncoderConfig, feature_frechet_distance, intensity_histogram_distance,  # noqa: E402
                             mask_consistency, nearest_neighbour_distance, train_feature_encoder)
from augment.synthesis import classical_set, save_grid, synthesize, validate_manifest  # noqa: E402
from augment.training import file_hash  # noqa: E402
from segment.data.protocol import ep1_support_indices, make_folds  # noqa: E402
from segment.data.slices import prepare  # noqa: E402
from segment.data.superpixels import superpixels  # noqa: E402
from segment.data.volumes import load_spec  # noqa: E402

ORGANS = ("liver", "right_kidney", "left_kidney", "spleen")
PROFILES = {  # name -> (resolution, DDPM overrides, GAN overrides)
    # v prediction: x0 = sqrt(abar) x_t - sqrt(1 - abar) v needs no division by sqrt(abar) ~ 5e-5 at t = T, which
    # made an eps model trained for only ~200 steps sample saturated noise (measured on the first CPU run)
    "cpu": (128, dict(block_channels=(16, 32, 64, 128), batch_size=8, pretrain_steps=180, finetune_steps=30,
                      prediction_type="v_prediction", lr=5e-4, finetune_lr=2e-4),
            dict(gen_channels=64, disc_channels=32, batch_size=8, pretrain_steps=240, finetune_steps=40)),
    "gpu": (256, dict(block_channels=(32, 64, 128, 256), attention=True, batch_size=32, pretrain_steps=4000,
                      prediction_type="v_prediction",
                      finetune_steps=500, cpu=False, mixed_precision="bf16"),
            dict(gen_channels=128, disc_channels=64, n_up=5, batch_size=32, pretrain_steps=4000,
                 finetune_steps=500, cpu=False, mixed_precision="bf16")),
}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "augment_generators"), help="checkpoints")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--profile", choices=list(PROFILES), default="cpu")
    p.add_argument("--fold", type=int, default=0)
    p.add_argument("--n-synthetic", type=int, default=32)
    p.add_argument("--sampler", default="dpmsolver++", choices=list(ddpm.SAMPLERS))
    p.add_argument("--sample-steps", type=int, default=10)
    p.add_argument("--pipeline-batch", type=int, default=2, help="batch timed through the 1000-step DDPMPipeline")
    p.add_argument("--pipeline-steps", type=int, default=1000)
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--repeats", type=int, default=3, help="timing repeats of the fast samplers (fastest is kept)")
    p.add_argument("--throughput-only", action="store_true",
                   help="re-time the samplers on the checkpoints of an earlier run (writes ..._throughput files)")
    p.add_argument("--smoke", action="store_true", help="a few steps everywhere, to check the script end to end")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args()


def configs(args) -> tuple[ddpm.DDPMConfig, gan.GANConfig]:
    res, d_over, g_over = PROFILES[args.profile]
    d = ddpm.DDPMConfig(resolution=res, seed=args.seed, sampler=args.sampler, sample_steps=args.sample_steps,
                        **d_over)
    g = gan.GANConfig(resolution=res, seed=args.seed, **g_over)
    if args.smoke:
        d = replace(d, pretrain_steps=2, finetune_steps=1)
        g = replace(g, pretrain_steps=2, finetune_steps=1)
    return d, g


def pretrain_pool(data, fold, sp_maps: dict, seed: int) -> tuple[np.ndarray, np.ndarray, list[SliceRef]]:
    """Images of the fold's training volumes, each with one random mid-sized superpixel as its condition."""
    rng = np.random.default_rng(seed)
    images, masks, ids = [], [], []
    for vid in fold.train:
        vol, sp = data.volume(vid), sp_maps[vid]
        for z in range(len(vol.images)):
            labels, counts = np.unique(sp[z], return_counts=True)
            ok = labels[(labels > 0) & (counts >= 0.005 * sp[z].size) & (counts <= 0.3 * sp[z].size)]
            if len(ok) == 0:
                continue
            masks.append(sp[z] == rng.choice(ok))
            images.append(vol.images[z])
            ids.append(SliceRef(vid, z))
    return (np.stack(images)[:, None].astype(np.float32), np.stack(masks)[:, None].astype(np.float32), ids)


def organ_slices(data, volume_ids, class_id: int) -> tuple[np.ndarray, np.ndarray]:
    """All slices of the given volumes that contain the class, with its mask."""
    imgs, msks = [], []
    for vid in volume_ids:
        vol = data.volume(vid)
        for z in np.flatnonzero((vol.labels == class_id).any(axis=(1, 2))):
            imgs.append(vol.images[z])
            msks.append(vol.labels[z] == class_id)
    return np.stack(imgs)[:, None].astype(np.float32), np.stack(msks)[:, None].astype(np.float32)


def _pixel_features(images: torch.Tensor) -> np.ndarray:
    """(N, 1, H, W) -> (N*H*W, F): smoothed intensity at 4 scales and gradient magnitude at 2."""
    out = []
    for im in images[:, 0].numpy():
        f = [ndimage.gaussian_filter(im, s) for s in (0.5, 1, 2, 4)]
        f += [ndimage.gaussian_gradient_magnitude(im, s) for s in (1, 2)]
        out.append(np.stack(f, -1).reshape(-1, len(f)))
    return np.concatenate(out)


def pixel_classifier(support_images, support_masks, query_images) -> torch.Tensor:
    """Segmenter for mask consistency: logistic regression on pixel features of the real supports only."""
    clf = LogisticRegression(max_iter=300, class_weight="balanced")
    clf.fit(_pixel_features(support_images), support_masks.numpy().ravel() > 0.5)
    prob = clf.predict_proba(_pixel_features(query_images))[:, 1]
    return torch.from_numpy(prob.reshape(query_images.shape).astype(np.float32))


def _fastest(fn, repeats: int) -> float:
    """Shortest of `repeats` wall times of `fn()`: other users' jobs on a shared machine only add time."""
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def time_throughput(ckpt_path: Path, masks: torch.Tensor, args, gan_ckpt: Path) -> dict:
    """Few-step sampler vs DDPMPipeline (1000 steps) on the same DDPM checkpoint, plus the GAN."""
    n, small = len(masks), masks[: args.pipeline_batch]
    k, r = len(small), args.repeats
    ddpm.sample(ckpt_path, masks[:2], seed=0, steps=2)  # warm-up
    few_by_steps = {steps: _fastest(lambda: ddpm.sample(ckpt_path, masks, seed=0, steps=steps, sampler=args.sampler,
                                                        batch_size=16), r)
                    for steps in sorted({5, args.sample_steps, 20})}
    few = few_by_steps[args.sample_steps]
    few_small = _fastest(lambda: ddpm.sample(ckpt_path, small, seed=0, steps=args.sample_steps, sampler=args.sampler), r)
    pipe = ddpm.reference_pipeline(ckpt_path, small)
    ref = _fastest(lambda: pipe(batch_size=k, num_inference_steps=args.pipeline_steps,
                                generator=torch.Generator().manual_seed(0), output_type="np"), 1)  # slow: once
    gan.sample(gan_ckpt, masks[:2], seed=0)
    g = _fastest(lambda: gan.sample(gan_ckpt, masks, seed=0), r)
    return {
        "repeats": r, "timing": "fastest of the repeats (the 1000-step pipeline: one run)",
        "ddpm_pairs_per_s_by_steps": {s: round(n / t, 3) for s, t in few_by_steps.items()},
        "ddpm_few_step": {"sampler": args.sampler, "steps": args.sample_steps, "batch": 16, "pairs": n,
                          "seconds": round(few, 2), "pairs_per_s": round(n / few, 3)},
        "ddpm_few_step_small_batch": {"batch": k, "seconds": round(few_small, 2), "pairs_per_s": round(k / few_small, 3)},
        "ddpm_pipeline_1000": {"steps": args.pipeline_steps, "batch": k, "seconds": round(ref, 2),
                               "pairs_per_s": round(k / ref, 4)},
        "speedup_same_batch": round(ref / few_small, 1),
        "speedup_end_to_end": round((ref / k) / (few / n), 1),
        "gan": {"pairs": n, "seconds": round(g, 3), "pairs_per_s": round(n / g, 1)},
    }


def throughput_markdown(tp: dict) -> list[str]:
    few, small, ref = tp["ddpm_few_step"], tp["ddpm_few_step_small_batch"], tp["ddpm_pipeline_1000"]
    return ["| sampler | steps | batch | pairs/s |", "|---|---|---|---|",
            f"| {few['sampler']} | {few['steps']} | 16 | {few['pairs_per_s']} |",
            f"| {few['sampler']} | {few['steps']} | {small['batch']} | {small['pairs_per_s']} |",
            f"| DDPMPipeline | {ref['steps']} | {ref['batch']} | {ref['pairs_per_s']} |",
            f"| GAN generator | 1 | 32 | {tp['gan']['pairs_per_s']} |", "",
            "Few-step sampler, batch 16, pairs/s by number of steps: " +
            ", ".join(f"{k} steps: {v}" for k, v in tp["ddpm_pairs_per_s_by_steps"].items()) +
            f" ({tp.get('timing', 'single run each')}).", "",
            f"Speed-up of the few-step sampler over DDPMPipeline: {tp['speedup_same_batch']}x at the same batch, "
            f"{tp['speedup_end_to_end']}x end to end (batch 16 vs {ref['batch']}).", ""]


def quality_row(arm, enc, real_ref, support, support_x) -> dict:
    imgs, msks = arm
    return {"frechet": round(feature_frechet_distance(enc, real_ref[0], imgs), 3),
            "hist_tv": round(intensity_histogram_distance(real_ref[0], imgs), 4),
            "hist_tv_in_mask": round(intensity_histogram_distance(real_ref[0], imgs, real_masks=real_ref[1],
                                                                  synthetic_masks=msks), 4),
            "mask_consistency_dice": round(mask_consistency(pixel_classifier, *support, imgs, msks)["mean_dice"], 4),
            "nn_rms_to_support": round(nearest_neighbour_distance(support_x, imgs)["mean"], 4)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    load_start = os.getloadavg()
    d_cfg, g_cfg = configs(args)
    res = d_cfg.resolution
    runs = Path(args.runs) / f"{args.profile}{args.tag}"
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    # 1. data, fold and the unlabelled pretraining pool (training volumes only)
    spec = load_spec("abd_mri")
    data = prepare(spec, ROOT / args.data, resolution=res, cache_dir=args.cache)  # a relative --data: from the repo root
    fold = make_folds(list(data.ids), spec.n_folds)[args.fold]
    sp_maps = superpixels(data, cache_dir=args.cache, volume_ids=fold.train)
    pre_x, pre_m, pre_ids = pretrain_pool(data, fold, sp_maps, args.seed)
    if args.smoke:
        pre_x, pre_m, pre_ids = pre_x[:16], pre_m[:16], pre_ids[:16]
    prov = Provenance(fold=fold.index, setting=1, pretrain=tuple(pre_ids), query_volumes=fold.queries,
                      notes="pretrain: unlabelled images of the training volumes, superpixel conditions")
    timings: dict = {"ddpm": {}, "gan": {}}  # wall seconds
    cpu_s: dict = {"ddpm": {}, "gan": {}}    # process CPU seconds: what a dedicated machine would need
    ckpts: dict = {"ddpm": {}, "gan": {}}
    # 2. pretrain each generator once for the fold, then fine-tune per organ on its 3 support pairs
    supports = {}
    sup_vol = data.volume(fold.support)
    for organ in ORGANS:
        cid = spec.class_id(organ)
        idx = ep1_support_indices(sup_vol.labels, cid)
        supports[organ] = (sup_vol.images[idx][:, None].astype(np.float32),
                           (sup_vol.labels[idx] == cid)[:, None].astype(np.float32), refs(fold.support, idx))
    masks_tp = torch.from_numpy(np.concatenate([supports[o][1] for o in ORGANS]))
    masks_tp = masks_tp.repeat(3, 1, 1, 1)[: (4 if args.smoke else 32)]
    if args.throughput_only:
        return throughput_only(args, runs, masks_tp, out_dir, load_start)
    for name, module, cfg in (("ddpm", ddpm, d_cfg), ("gan", gan, g_cfg)):
        t, c = time.perf_counter(), time.process_time()
        ckpts[name]["pretrain"] = module.train(cfg, pretrain_pairs=(pre_x, pre_m), provenance=prov,
                                               out_dir=runs / name / "pretrain")
        timings[name]["pretrain_s"] = round(time.perf_counter() - t, 1)
        cpu_s[name]["pretrain_s"] = round(time.process_time() - c, 1)
        for organ in ORGANS:
            x, m, ids = supports[organ]
            t, c = time.perf_counter(), time.process_time()
            ckpts[name][organ] = module.train(
                cfg, finetune_pairs=(x, m), init_checkpoint=ckpts[name]["pretrain"], out_dir=runs / name / organ,
                provenance=Provenance(fold=fold.index, class_name=organ, setting=1, finetune=ids,
                                      query_volumes=fold.queries))
            timings[name][f"finetune_{organ}_s"] = round(time.perf_counter() - t, 1)
            cpu_s[name][f"finetune_{organ}_s"] = round(time.process_time() - c, 1)
    train_total = sum(v for g in timings.values() for v in g.values())
    train_cpu = sum(v for g in cpu_s.values() for v in g.values())
    print(f"training done in {train_total:.0f} s wall, {train_cpu:.0f} s process CPU time", flush=True)
    # 3. throughput on the pretrained DDPM and GAN, same masks
    throughput = time_throughput(ckpts["ddpm"]["liver"], masks_tp,
                                 replace_args(args, pipeline_steps=20) if args.smoke else args, ckpts["gan"]["liver"])
    print(json.dumps(throughput), flush=True)
    # 4. quality per organ against the real query slices (never used for training)
    enc = train_feature_encoder(torch.from_numpy(pre_x), EncoderConfig(steps=20 if args.smoke else 200, seed=args.seed))
    quality, grids, manifests = {}, {}, {}
    n = 4 if args.smoke else args.n_synthetic
    for organ in ORGANS:
        x, m, ids = supports[organ]
        real_ref = tuple(map(torch.from_numpy, organ_slices(data, fold.queries, spec.class_id(organ))))
        arms = {"classical": classical_set(x, m, ids, n=n, seed=args.seed, fold=fold.index, class_name=organ,
                                           query_volumes=fold.queries)}
        for name in ("ddpm", "gan"):
            arms[name] = synthesize(ckpts[name][organ], x, m, ids, n=n, seed=args.seed,
                                    steps=args.sample_steps if name == "ddpm" else None,
                                    query_volumes=fold.queries)
        for syn in arms.values():
            validate_manifest(syn.manifest, fold.queries)  # raises on leakage
        support = (torch.from_numpy(x), torch.from_numpy(m))
        quality[organ] = {"real_query_slices": quality_row(real_ref, enc, real_ref, support, support[0]) | {"n": len(real_ref[0])}}
        quality[organ] |= {k: quality_row((s.images, s.masks), enc, real_ref, support, support[0]) for k, s in arms.items()}
        grids[organ] = str(save_grid({"real support": support, **{k: (s.images, s.masks) for k, s in arms.items()}},
                                     out_dir / f"augment_grid_{organ}{args.tag}.png", n=8,
                                     title=f"{organ}, fold {fold.index}, {args.profile} profile").relative_to(ROOT))
        manifests[organ] = {k: {kk: s.manifest[kk] for kk in ("generator", "checkpoint_sha256", "seed", "sampler",
                                                              "steps", "support")} for k, s in arms.items()}
        print(organ, json.dumps(quality[organ]), flush=True)
    result = {
        "issue": 4, "profile": args.profile, "resolution": res, "fold": fold.index, "setting": 1,
        "smoke": args.smoke, "device": "cpu" if d_cfg.cpu else "gpu", "threads": args.threads,
        "cpu_count": os.cpu_count(), "load_avg_start": load_start, "load_avg_end": os.getloadavg(),
        "versions": {"python": platform.python_version(), "torch": torch.__version__},
        "configs": {"ddpm": asdict(d_cfg), "gan": asdict(g_cfg), "deform": asdict(DeformConfig()),
                    "encoder": asdict(EncoderConfig())},
        "data": {"support_volume": fold.support, "query_volumes": list(fold.queries), "train_volumes": list(fold.train),
                 "pretrain_slices": len(pre_ids)},
        "training_seconds": timings, "training_total_s": round(train_total, 1),
        "training_within_30_min": train_total <= 1800, "training_cpu_seconds": cpu_s,
        "training_cpu_total_s": round(train_cpu, 1), "throughput": throughput, "quality": quality,
        "grids": grids, "manifests": manifests, "wall_s": round(time.perf_counter() - t_start, 1),
    }
    (out_dir / f"augment_generators{args.tag}.json").write_text(json.dumps(result, indent=2, default=str))
    (out_dir / f"augment_generators{args.tag}.md").write_text(markdown(result, args))
    print(f"wrote {out_dir}/augment_generators{args.tag}.json and .md", flush=True)


def throughput_only(args, runs: Path, masks: torch.Tensor, out_dir: Path, load_start) -> None:
    """Re-time the samplers on the liver checkpoints of an earlier full run (same models, more repeats)."""
    ckpt = {name: runs / name / "liver" / "checkpoint.pt" for name in ("ddpm", "gan")}
    tp = time_throughput(ckpt["ddpm"], masks, args, ckpt["gan"])
    result = {"issue": 4, "profile": args.profile, "threads": args.threads, "cpu_count": os.cpu_count(),
              "load_avg_start": load_start, "load_avg_end": os.getloadavg(), "throughput": tp,
              "checkpoints": {k: {"path": str(v.relative_to(ROOT)), "sha256": file_hash(v)} for k, v in ckpt.items()}}
    name = f"augment_generators_throughput{args.tag}"
    (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2))
    (out_dir / f"{name}.md").write_text("\n".join([
        f"# Sampler throughput (issue 4), {args.profile} profile, re-timed on the full run's liver checkpoints", "",
        f"Command: `.venv/bin/python benchmarks/augment_generators.py {' '.join(sys.argv[1:])}`",
        f"Machine: {os.cpu_count()} CPUs, torch threads {args.threads}, load average {[round(x, 1) for x in load_start]} "
        f"at start, {[round(x, 1) for x in result['load_avg_end']]} at end (shared machine).", "",
        *throughput_markdown(tp)]))
    print(json.dumps(tp), flush=True)


def replace_args(args, **changes) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


def markdown(r: dict, args) -> str:
    tp = r["throughput"]
    lines = [f"# Augment generators (issue 4): {r['profile']} profile, {r['resolution']} px, fold {r['fold']}",
             "", f"Command: `.venv/bin/python benchmarks/augment_generators.py {' '.join(sys.argv[1:])}`",
             f"Machine: {r['cpu_count']} CPUs, torch threads {r['threads']}, load average at start "
             f"{[round(x, 1) for x in r['load_avg_start']]} (machine shared with other developers).", "",
             "## Throughput (same DDPM checkpoint)", "", *throughput_markdown(tp),
             "## Training budget (one fold, 4 organs)", "", "| generator | phase | wall s | CPU s |", "|---|---|---|---|"]
    for g, phases in r["training_seconds"].items():
        lines += [f"| {g} | {k[:-2]} | {v} | {r['training_cpu_seconds'][g][k]} |" for k, v in phases.items()]
    lines += ["", f"Total {r['training_total_s']} s wall; within 30 minutes: {r['training_within_30_min']}. "
              f"Process CPU time {r['training_cpu_total_s']} s with {r['threads']} torch thread(s) (what the run "
              f"needs on an otherwise idle machine; the wall time includes waiting for other developers' jobs).", "",
              "## Quality against the real query slices of each organ (never used for training)", "",
              "Frechet: features of an encoder trained here on the training pool (no downloaded weights; not "
              "comparable with FID). hist_tv: total-variation distance of intensity histograms (whole image / inside "
              "the mask). Mask consistency: Dice of a pixel classifier fitted on the 3 real supports only. nn_rms: RMS "
              "distance to the nearest support image (small = copying).", "",
              "| organ | arm | Frechet | hist_tv | hist_tv in mask | mask consistency | nn_rms to support |",
              "|---|---|---|---|---|---|---|"]
    for organ, arms in r["quality"].items():
        for arm, q in arms.items():
            lines.append(f"| {organ} | {arm} | {q['frechet']} | {q['hist_tv']} | {q['hist_tv_in_mask']} | "
                         f"{q['mask_consistency_dice']} | {q['nn_rms_to_support']} |")
    lines += ["", "Grids (rows: real support, classical, DDPM, GAN; red = mask outline): " +
              ", ".join(f"`{p}`" for p in r["grids"].values()), ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
