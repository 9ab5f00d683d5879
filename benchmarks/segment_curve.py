"""Benchmark: EP1 Dice against training steps on one fold (does a longer schedule still pay?).

Trains one segmenter for `--steps` steps, stopping at every `--every` steps with a resumable checkpoint
(`train(..., stop_at=k)`), and scores that checkpoint with the protocol's evaluator on the fold (Setting
1, native label grid, no post-processing as the headline). The learning-rate schedule is that of the
full run, so the curve shows where a run of this length stands, not what a shorter run would reach.
Config fields are overridden as in segment_fewshot (`--set key=value`).
Writes benchmarks/results/segment_curve[_tag].json and .md.

    .venv/bin/python benchmarks/segment_curve.py --fold 3 --steps 3000 --every 500
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from segment_fewshot import cfg_key, parse_overrides  # noqa: E402 (one --set parser for both benchmarks)
from segment.predict import make_predictor  # noqa: E402
from segment.data.protocol import evaluate, make_folds  # noqa: E402
from segment.data.slices import prepare  # noqa: E402
from segment.train import SegmenterConfig, load, train  # noqa: E402
from segment.data.volumes import load_spec  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="abd_mri")
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--fold", type=int, default=3)
    p.add_argument("--model", default="prototype")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--every", type=int, default=500)
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="SegmenterConfig overrides")
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "segment_curve"))
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    data = Path(args.data)
    args.data = str(data if data.is_absolute() else (ROOT / data).resolve())
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    cfg = SegmenterConfig.from_dict({**asdict(SegmenterConfig()), "model": args.model, "steps": args.steps,
                                     "checkpoint_every": args.every, **parse_overrides(args.set)})
    data = prepare(spec, args.data, resolution=cfg.resolution, cache_dir=args.cache)
    fold = make_folds(data.ids, spec.n_folds)[args.fold]
    class_ids = tuple(spec.class_id(n) for n in spec.classes)
    run_dir = Path(args.runs) / f"{spec.name}-{data.key}" / f"{args.model}-{cfg_key(cfg)}" / f"fold{fold.index}"
    points, t0, trained_s = [], time.time(), 0.0
    for stop in range(args.every, args.steps + 1, args.every):
        # 1. train up to `stop` (resuming from the previous stop)
        t1 = time.time()
        ckpt = train(cfg, data, fold, test_class_ids=class_ids, setting=1, out_dir=run_dir, cache_dir=args.cache,
                     stop_at=stop)
        trained_s += time.time() - t1
        # 2. score that checkpoint on the fold: EP1, native grid
        model = load(ckpt)
        res = evaluate(None, data, [fold], classes=spec.classes, protocol="EP1", dice_grid="native",
                       predictor_for_fold=lambda f, name: make_predictor(model))
        points.append({"step": stop, "mean": res["mean"], "mean_post": res["mean_post"],
                       "per_class": res["per_class"], "train_seconds": round(trained_s, 1)})
        print(f"step {stop}: EP1 {100 * res['mean']:.1f} (post {100 * res['mean_post']:.1f})", flush=True)
    result = {"benchmark": "segment_curve", "spec": spec.name, "fold": fold.index, "setting": 1, "protocol": "EP1",
              "dice_grid": "native", "config": asdict(cfg), "points": points,
              "command": " ".join([".venv/bin/python benchmarks/segment_curve.py", *sys.argv[1:]]),
              "wall_seconds": round(time.time() - t0, 1)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "segment_curve" + (f"_{args.tag}" if args.tag else "")
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    lines = [f"# EP1 Dice against training steps, {spec.name} fold {fold.index}, Setting 1", "",
             f"Command: `{result['command']}`", "", "Native label grid; headline without post-processing. The "
             "learning rate follows the full run's schedule (warm-up, cosine to 5 %).", "",
             "| step | " + " | ".join(spec.classes) + " | mean | mean + 3D largest component | train s |",
             "|---" * (len(spec.classes) + 4) + "|"]
    for p in points:
        lines.append(f"| {p['step']} | " + " | ".join(f"{100 * p['per_class'].get(c, float('nan')):.1f}"
                                                     for c in spec.classes)
                     + f" | **{100 * p['mean']:.1f}** | {100 * p['mean_post']:.1f} | {p['train_seconds']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines + [""]))
    print(f"wrote {out / stem}.json and .md")
    return result


if __name__ == "__main__":
    main()
