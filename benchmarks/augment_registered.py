"""Benchmark: label accuracy of the registered source's pairs, before and after relabelling; joins `augment`,
`segment` and `pipelines`.

For each fold and class of an experiment config (seed `--seed`), the pipeline's own stages make the registered
set (every candidate that passes the label-free checks: a training volume's slice with the support mask warped
onto it by the learned registration) and the baseline arm's fine-tuned segmenter (the teacher). Per candidate
it measures, against the TRUE mask of the target slice (labels read for this measurement only): the warped
mask, the teacher's prediction, and their agreement (Dice between the two, which needs no label). Per
agreement threshold: how many pairs agree, and how right the kept masks are. `min_agreement` is the highest
threshold that keeps at least `n_pairs` agreeing pairs per fold and class on average; no test Dice is read.
Writes benchmarks/results/augment_registered{_tag}.json and .md, and per class a PNG of the first fold's kept
pairs with the relabelled mask (red) and the true one (green).

    .venv/bin/python benchmarks/augment_registered.py --data ../shared/data/chaos_t2      # 5 folds, ~4 min cached
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.registered import agreement  # noqa: E402
from augment.synthesis import load_set  # noqa: E402
from pipelines.cache import StageCache  # noqa: E402
from pipelines.config import Arm, check_teachers, load, teacher_chain  # noqa: E402
from pipelines.runner import load_data, select  # noqa: E402
from pipelines.stages.base import StageRunner  # noqa: E402
from pipelines.stages.inputs import support_pairs  # noqa: E402
from pipelines.stages.unit import (ArmModels, base_segmenters, generator_config, superpixel_stage,  # noqa: E402
                                   synthesis_set)
from segment import train as seg_train  # noqa: E402
from segment.predict import make_predictor  # noqa: E402

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/abd_mri_pairs_cpu_landed_ft300.toml",
                   help="experiment config (relative: to the repo root); needs a [generators.learned] section")
    p.add_argument("--data", default=None, help="data folder, as the CLI's --data")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default="prototype")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    p.add_argument("--teacher", default=None,
                   help="the config's arm whose fine-tuned model relabels (default: the baseline arm): an augmented "
                        "arm measures a round of self-training")
    return p.parse_args(argv)


def measure(cfg, data, fold, seed: int, model: str, classes: tuple[str, ...], sp_entry, runner,
            shown: dict | None = None, taught_by: Arm | None = None) -> list[dict]:
    """One row per registered candidate of every class: its masks' Dice against the truth, and their agreement.
    `taught_by`'s teacher relabels (None: the baseline arm's model). With `shown`, each class's images, masks
    and agreement go there too, for `draw`."""
    rows = []
    bases = base_segmenters(cfg, data, fold, seed, model, classes, sp_entry, runner)
    synth = {(s, c): synthesis_set(cfg, data, fold, seed, s, c, classes, sp_entry, runner)
             for s in _taught_on(cfg, taught_by) for c in classes}
    made = ArmModels(cfg, data, fold, seed, model, bases, synth, runner)
    for c in classes:
        syn = load_set(synth["registered", c].path / "set")
        tutor = made.teacher(taught_by, c)
        real_i, real_m, _ = support_pairs(data, fold, c)
        predicted = (make_predictor(seg_train.load(tutor.path / "model.pt"))(real_i, real_m, syn.images) > 0.5).float()
        cid = data.spec.class_id(c)
        truth = torch.stack([torch.from_numpy(data.volume(p["volume"]).labels[p["slice"]] == cid).float()
                             for p in syn.manifest["pairs"]])[:, None]           # (P, 1, R, R), measurement only
        if shown is not None:
            shown[c] = (syn.images, predicted, truth, agreement(predicted, syn.masks))
        for k, (warped, taught, agree) in enumerate(zip(agreement(syn.masks, truth), agreement(predicted, truth),
                                                        agreement(predicted, syn.masks))):
            rows.append({"fold": fold.index, "class": c, "warped": float(warped), "teacher": float(taught),
                         "agreement": float(agree), "teacher_empty": bool(predicted[k].sum() == 0)})
    return rows


def _taught_on(cfg, arm: Arm | None) -> list[str]:
    """The registered source and the sources of every teacher up `arm`'s chain: the sets they need."""
    chain = teacher_chain(cfg.arms, arm) if arm is not None else ()
    return sorted({"registered"} | {s for a in chain for s in a.sources})


def _kept(agreeing: list[dict], n: int) -> list[dict]:
    """The pairs `relabel` keeps of those that agree: the `n` best agreeing of each fold and class."""
    units: dict = {}
    for r in agreeing:
        units.setdefault((r["fold"], r["class"]), []).append(r)
    return [r for rs in units.values() for r in sorted(rs, key=lambda r: -r["agreement"])[:n]]


def summarise(rows: list[dict], n_units: int, n_pairs: int) -> dict:
    """Accuracy of all candidates, and per threshold of those that agree (the pairs relabel may keep)."""
    pct = lambda xs: round(100 * float(np.mean(xs)), 1) if xs else None  # noqa: E731
    out = {"candidates": len(rows), "warped": pct([r["warped"] for r in rows]),
           "teacher": pct([r["teacher"] for r in rows]), "thresholds": {}}
    for t in THRESHOLDS:
        ok = [r for r in rows if r["agreement"] >= t and not r["teacher_empty"]]
        kept = _kept(ok, n_pairs)
        out["thresholds"][str(t)] = {"agreeing": len(ok), "per_unit": round(len(ok) / n_units, 1),
                                     "warped": pct([r["warped"] for r in ok]),
                                     "teacher": pct([r["teacher"] for r in ok]),
                                     "kept": len(kept), "kept_teacher": pct([r["teacher"] for r in kept]),
                                     "enough": len(ok) / n_units >= n_pairs}
    return out


def draw(shown: dict, min_agreement: float, n: int, fold: int, out_dir: Path, stem: str) -> list[str]:
    """Per class, the pairs relabel keeps (best agreement first): the relabelled mask in red, the TRUE mask in
    green (drawn for this diagnosis only). PNG files; returns their names."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for c, (images, predicted, truth, agree) in shown.items():
        keep = [int(i) for i in torch.argsort(-agree) if agree[i] >= min_agreement and predicted[i].sum() > 0][:n]
        cols = max(len(keep), 1)
        fig, axes = plt.subplots(1, cols, figsize=(1.8 * cols, 2.1), squeeze=False)
        for ax, i in zip(axes[0], keep):
            ax.imshow(images[i, 0].numpy(), cmap="gray")
            ax.contour(truth[i, 0].numpy(), levels=[0.5], colors="lime", linewidths=0.7)
            ax.contour(predicted[i, 0].numpy(), levels=[0.5], colors="red", linewidths=0.7)
            ax.set_title(f"Dice {100 * float(agreement(predicted[i:i + 1], truth[i:i + 1])[0]):.0f}", fontsize=7)
        for ax in axes[0]:
            ax.axis("off")
        fig.suptitle(f"{c}, fold {fold}: registered pairs kept at {min_agreement} (red: relabelled mask, "
                     f"green: truth)", fontsize=8)
        fig.tight_layout()
        name = f"{stem}_{c}.png"
        fig.savefig(out_dir / name, dpi=80)
        plt.close(fig)
        names.append(name)
    return names


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    path = Path(args.config) if Path(args.config).is_absolute() else ROOT / args.config
    cfg = load(path, data=args.data)
    taught_by = Arm(name="measured", sources=("registered",), role="augmented", teacher=args.teacher)
    check_teachers((*cfg.arms, taught_by))  # an arm of the config, and never a diagnostic one
    data = load_data(cfg)
    folds, classes = select(cfg, data)
    runner = StageRunner(StageCache(cfg.run.cache), frozenset(), logging.getLogger("augment_registered"))
    sp_entry = runner(superpixel_stage(cfg, data))
    shown: dict = {}  # the first fold's pairs, drawn
    rows = [r for k, fold in enumerate(tqdm(folds, desc="folds"))
            for r in measure(cfg, data, fold, args.seed, args.model, classes, sp_entry, runner,
                             shown if k == 0 else None, taught_by)]
    n = cfg.synthesis.n_pairs
    per_class = {c: summarise([r for r in rows if r["class"] == c], len(folds), n) for c in classes}
    total = summarise(rows, len(folds) * len(classes), n)
    enough = [float(t) for t, s in total["thresholds"].items() if s["enough"]]
    result = {"config": str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else path.name,
              "dataset": data.spec.name, "resolution": data.resolution, "folds": [f.index for f in folds],
              "seed": args.seed, "model": args.model, "teacher": args.teacher or "the baseline arm", "n_pairs": n,
              "all": total, "per_class": per_class,
              "chosen_min_agreement": max(enough) if enough else None, "seconds": round(time.time() - t0, 1)}
    out_dir = Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out
    out_dir.mkdir(parents=True, exist_ok=True)
    stem = f"augment_registered{'_' + args.tag if args.tag else ''}"
    drawn_at = result["chosen_min_agreement"] or generator_config(cfg, "registered", args.seed).min_agreement
    result["figures"] = draw(shown, drawn_at, n, folds[0].index, out_dir, stem)
    write(result, out_dir, stem)
    return result


def write(result: dict, out_dir: Path, stem: str) -> None:
    (out_dir / f"{stem}.json").write_text(json.dumps(result, indent=2))
    total = result["all"]
    lines = [f"# Registered pairs: label accuracy before and after relabelling ({result['dataset']}, "
             f"{result['resolution']} px, folds {result['folds']}, seed {result['seed']})", "",
             "Dice (%) of each mask against the TRUE mask of the target slice (labels read for this measurement "
             "only). Candidates: training-volume slices with the support mask warped onto them by the learned "
             f"registration, all passing the label-free checks. Teacher: the {result['model']} model of "
             f"{result['teacher']}, given the real supports. Agreement: Dice between the two masks, which needs no "
             "label.", "",
             f"All candidates ({total['candidates']}): warped masks {total['warped']}, teacher {total['teacher']}.", "",
             "| min agreement | agreeing pairs | per fold and class | warped masks right (%) | teacher's masks right "
             f"(%) | kept (the {result['n_pairs']} best agreeing per fold and class) | kept masks right (%) |",
             "|---|---|---|---|---|---|---|"]
    for t, s in total["thresholds"].items():
        lines.append(f"| {t} | {s['agreeing']} | {s['per_unit']} | {s['warped']} | {s['teacher']} | {s['kept']} | "
                     f"{s['kept_teacher']} |")
    chosen = result["chosen_min_agreement"]
    lines += ["", f"Chosen `min_agreement`: **{chosen}**, the highest threshold keeping at least {result['n_pairs']} "
              "agreeing pairs per fold and class on average.", "",
              f"| class | candidates | warped (%) | teacher (%) | agreeing at {chosen} | warped (%) | teacher (%) |",
              "|---|---|---|---|---|---|---|"]
    for c, s in result["per_class"].items():
        at = s["thresholds"].get(str(chosen), {})
        lines.append(f"| {c} | {s['candidates']} | {s['warped']} | {s['teacher']} | {at.get('agreeing')} | "
                     f"{at.get('warped')} | {at.get('teacher')} |")
    lines += [""] + [f"![{name}]({name})" for name in result["figures"]]
    lines += ["", f"Wall time {result['seconds']} s; stages already in the cache are reused, missing ones are run."]
    (out_dir / f"{stem}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
