"""Benchmark: both few-shot segmenters on any dataset spec, Settings 1 and 2, EP1 and EP2, 1-shot.

For each setting, model and fold it trains on the fold's training volumes only, then scores EP1 and EP2
with the protocol's evaluator (`segment.data.protocol`: Dice on the label files' native grid by default; the
headline `mean` has no post-processing, `mean_post` keeps the largest 3D component of each query
volume). Which classes share one trained model: Setting 1 without supervised episodes: one model per
fold for every class (no label is used); Setting 2: one model per fold and class group, because its
training slices are those without ANY class of the group (OR rule); with supervised episodes
(`--mix-supervised > 0`, the prototype net's default) one model per group (`--split group`) or per class
(`--split class`), trained on the labels of the other groups' classes only.
Then, by default, each trained model is fine-tuned per class and protocol on the labelled support slices
that protocol gives (3 for EP1, 1 for EP2: `segment.data.protocol.support_pairs`), `--finetune-steps`
steps, and scored both ways: the headline is the fine-tuned model, `<protocol>_base` the model before it.
Writes benchmarks/results/segment_{spec}_setting{N}.json and .md per setting.

    .venv/bin/python benchmarks/segment_fewshot.py                                  # Abd-MRI, Settings 1 and 2
    .venv/bin/python benchmarks/segment_fewshot.py --setting 2 --folds 0 --steps 300 --tag profile
    .venv/bin/python benchmarks/segment_fewshot.py --finetune-steps 0           # no test-time fine-tuning
    .venv/bin/python benchmarks/segment_fewshot.py --spec card_mri --data ../shared/data/card_mri

`--data` is taken relative to the repository root when it is not absolute.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import platform
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, fields
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from segment.predict import make_predictor  # noqa: E402
from segment.config import GRIDS, PROTOCOLS, SETTINGS  # noqa: E402
from segment.data.protocol import evaluate, make_folds, support_pairs  # noqa: E402
from segment.data.slices import prepare  # noqa: E402
from segment.data.superpixels import superpixels  # noqa: E402
from segment.train import SegmenterConfig, finetune, load, read_checkpoint, train  # noqa: E402
from segment.data.volumes import load_spec  # noqa: E402

# Published 1-shot EP1 Dice (%), as the papers report them (not re-run), per (spec, setting).
PUBLISHED = {
    ("abd_mri", 1): {"SSL-ALPNet (r)": {"liver": 76.10, "right_kidney": 85.18, "left_kidney": 81.92,
                                        "spleen": 72.18, "mean": 78.84}},
    ("abd_mri", 2): {"SSL-ALPNet (r)": {"mean": 73.02}},
    ("card_mri", 1): {"SSL-ALPNet (r)": {"mean": 76.90}},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--spec", default="abd_mri", help="built-in spec name or spec .toml")
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--setting", nargs="+", type=int, choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--protocols", nargs="+", choices=PROTOCOLS, default=list(PROTOCOLS))
    p.add_argument("--dice-grid", choices=GRIDS, default="native")
    p.add_argument("--cache", default=str(ROOT / ".cache"))
    p.add_argument("--runs", default=str(ROOT / "runs" / "segment_fewshot"), help="checkpoints (resumable)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="", help="suffix of the result files (e.g. 'profile')")
    p.add_argument("--models", nargs="+", default=["prototype", "conditional"])
    p.add_argument("--folds", nargs="+", type=int, default=None, help="default: every fold of the spec")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--steps", type=int, default=3000, help="prototype net (and the conditional net without --conditional-steps)")
    p.add_argument("--conditional-steps", type=int, default=1000, help="the conditional net is ~1.5x slower per step")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--width", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--mix-superpixel", type=float, default=1.0)
    p.add_argument("--mix-supervised", type=float, default=1.0,
                   help="weight of supervised episodes from the classes outside the test group (superpixel "
                        "episodes weigh --mix-superpixel), prototype net. CHAOS Setting 1, fine-tuned: EP1 72.8 "
                        "(0) -> 74.5 (0.5) -> 75.5 (1.0), 1.0 better than 0 on all 5 folds; one model per group "
                        "(issue 13)")
    p.add_argument("--conditional-mix-supervised", type=float, default=0.0,
                   help="the same for the conditional net; off: its figures were measured without, and "
                        "supervised episodes were not measured for it")
    p.add_argument("--split", choices=["group", "class"], default="group")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--finetune-steps", type=int, default=100,
                   help="prototype net: test-time fine-tuning on the protocol's labelled support slices (0: none). "
                        "CHAOS Setting 1: EP1 68.2 -> 72.8, EP2 37.2 -> 44.7, better on all 5 folds (issue 13)")
    p.add_argument("--conditional-finetune-steps", type=int, default=0,
                   help="the same for the conditional net; off: 100 steps gave EP1 +2.1 but -5.3 on one fold, "
                        "and EP2 -1.9 (4 of 5 folds worse)")
    p.add_argument("--self-support", type=int, default=0,
                   help="test-time refinement rounds with self-support prototypes (prototype model only)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override any other SegmenterConfig field for every model (e.g. neighbour_span=2)")
    p.add_argument("--conditional-set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override SegmenterConfig fields of the conditional model only (after --set)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (1: on a busy 2-core machine 2 threads ran 10x slower)")
    p.add_argument("--jobs", type=int, default=2, help="models trained in parallel processes (1: in this process)")
    args = p.parse_args(argv)
    data = Path(args.data)
    args.data = str(data if data.is_absolute() else (ROOT / data).resolve())
    return args


def class_splits(spec, setting: int, split: str, supervised: bool) -> list[tuple[str, ...]]:
    """Which classes share one trained model (see the module docstring)."""
    if setting == 1 and not supervised:
        return [spec.classes]
    if split == "class":
        return [(c,) for c in spec.classes]
    groups = []
    for c in spec.classes:
        g = tuple(x for x in spec.classes if x in spec.group_of(c))
        if g not in groups:
            groups.append(g)
    return groups


def parse_overrides(pairs: list[str]) -> dict:
    """["key=value", ...] -> {key: value typed like the SegmenterConfig field}; an unknown key or a value
    of the wrong type fails naming it and the valid keys."""
    kinds = {f.name: type(getattr(SegmenterConfig, f.name)) for f in fields(SegmenterConfig)}
    out = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in kinds:
            raise SystemExit(f"segment_fewshot: error: --set {pair!r}: expected KEY=VALUE with KEY one of {sorted(kinds)}")
        kind = kinds[key]
        try:
            out[key] = {"true": True, "false": False}[raw.lower()] if kind is bool else kind(raw)
        except (KeyError, ValueError):
            raise SystemExit(f"segment_fewshot: error: --set {pair!r}: {key} takes a {kind.__name__}") from None
    return out


def model_config(kind: str, args) -> SegmenterConfig:
    steps = args.conditional_steps if (kind == "conditional" and args.conditional_steps) else args.steps
    mix_supervised = args.conditional_mix_supervised if kind == "conditional" else args.mix_supervised
    overrides = {**parse_overrides(args.set), **(parse_overrides(args.conditional_set) if kind == "conditional" else {})}
    return SegmenterConfig.from_dict({**asdict(SegmenterConfig()), **dict(
        model=kind, resolution=args.resolution, steps=steps, batch=args.batch, width=args.width, lr=args.lr,
        seed=args.seed, mix_superpixel=args.mix_superpixel, mix_supervised=mix_supervised,
        checkpoint_every=250), **overrides})


def cfg_key(cfg: SegmenterConfig) -> str:
    """Hash of the fields that differ from the defaults (stable when a new defaulted field appears)."""
    changed = {k: v for k, v in asdict(cfg).items() if v != getattr(SegmenterConfig, k)}
    return hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:10]


def train_job(kind: str, setting: int, fold_index: int, names: tuple[str, ...], args) -> tuple[str, float]:
    """One training run (in a worker process or this one): (checkpoint path, seconds). Resumes if interrupted."""
    torch.set_num_threads(args.threads)
    spec = load_spec(args.spec)
    data = prepare(spec, args.data, resolution=args.resolution, cache_dir=args.cache)
    fold = make_folds(data.ids, spec.n_folds)[fold_index]  # ids come sorted numerically
    cfg = model_config(kind, args)
    run_dir = (Path(args.runs) / f"{spec.name}-{data.key}" / f"setting{setting}" / f"{kind}-{cfg_key(cfg)}"
               / f"fold{fold.index}-{'_'.join(names)}")
    t0 = time.time()
    ckpt = train(cfg, data, fold, test_class_ids=tuple(spec.class_id(n) for n in names), setting=setting,
                 out_dir=run_dir, cache_dir=args.cache)
    seconds = trained_seconds(ckpt, default=round(time.time() - t0, 1))
    return str(ckpt), seconds, finetune_all(kind, ckpt, data, fold, names, run_dir, args)


def trained_seconds(ckpt: Path, default: float | None = None) -> float | None:
    """The training time a checkpoint records (a checkpoint reused from an earlier run keeps its own)."""
    return checkpoint_meta(ckpt).get("seconds_this_run", default)


def checkpoint_meta(ckpt: Path) -> dict:
    return read_checkpoint(ckpt).get("meta", {})


def finetune_steps(kind: str, args) -> int:
    return args.conditional_finetune_steps if kind == "conditional" else args.finetune_steps


def finetune_all(kind: str, ckpt: Path, data, fold, names: tuple[str, ...], run_dir: Path, args) -> dict:
    """Fine-tune `ckpt` per (protocol, class) on the support slices that protocol gives; nothing else is read.

    Returns {"<protocol>/<class>": (checkpoint, seconds)}; empty when the model's fine-tuning steps are 0."""
    out, steps = {}, finetune_steps(kind, args)
    if steps <= 0:
        return out
    support = data.volume(fold.support)
    for protocol in args.protocols:
        for name in names:
            images, masks, _ = support_pairs(support, data.spec.class_id(name), protocol)  # (S, 1, R, R)
            path = finetune(ckpt, torch.from_numpy(images), torch.from_numpy(masks), out_dir=run_dir / f"finetune{steps}-{protocol}-{name}",
                            steps=steps, seed=args.seed)
            out[f"{protocol}/{name}"] = (str(path), trained_seconds(path, default=0.0))
    return out


def train_all(tasks: list[tuple], args) -> Iterator[tuple[tuple, tuple[str, float, dict]]]:
    """Train (and fine-tune) every (kind, setting, fold, class split), yielding (task, `train_job`'s result) as each ends;
    in parallel worker processes when --jobs > 1, else in this process."""
    if args.jobs <= 1:
        for task in tasks:
            yield task, train_job(*task, args)
        return
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = {pool.submit(train_job, *task, args): task for task in tasks}
        for job in as_completed(jobs):
            yield jobs[job], job.result()


def evaluate_model(kind: str, setting: int, args, data, folds, trained: dict) -> dict:
    """EP1 and EP2 of the trained models of one kind, fine-tuned (the headline) and before fine-tuning
    (`<protocol>_base`); `trained[(fold, names)]` = `train_job`'s (checkpoint, seconds, fine-tunes)."""
    bases = {(f, n): path for (f, names), (path, _, _) in trained.items() for n in names}
    tuned = {(f, *key.split("/")): path for (f, _), (_, _, fts) in trained.items() for key, (path, _) in fts.items()}
    rounds = args.self_support if kind == "prototype" else 0

    def predictor_for(protocol: str | None):
        def make(fold, name):
            path = bases[(fold.index, name)] if protocol is None else tuned[(fold.index, protocol, name)]
            return make_predictor(load(path), self_support=rounds)  # probabilities; the evaluator post-processes
        return make

    steps, cfg = finetune_steps(kind, args), model_config(kind, args)
    splits = class_splits(data.spec, setting, args.split, cfg.mix_supervised > 0)  # as the config trained them
    out = {"config": asdict(cfg), "self_support": rounds, "finetune_steps": steps,
           "splits": [list(s) for s in splits],
           "train_seconds": {f"fold{f}/{'+'.join(names)}": t for (f, names), (_, t, _) in trained.items()},
           "episode_sources": {f"fold{f}/{'+'.join(names)}": checkpoint_meta(path).get("episode_sources")
                               for (f, names), (path, _, _) in trained.items()},
           "finetune_seconds": {f"fold{f}/{key}": t for (f, _), (_, _, fts) in trained.items()
                                for key, (_, t) in fts.items()}}
    for protocol in args.protocols:
        arms = [(protocol, protocol), (f"{protocol}_base", None)] if steps > 0 else [(protocol, None)]
        for key, tuned_for in arms:
            t0 = time.time()
            res = evaluate(None, data, folds, classes=data.spec.classes, protocol=protocol, dice_grid=args.dice_grid,
                           predictor_for_fold=predictor_for(tuned_for))
            res["seconds"] = round(time.time() - t0, 1)
            out[key] = res
    return out


def headline(result: dict) -> dict:
    """Model -> protocol -> the headline mean (no post-processing) and the post-processed mean beside it,
    with the means before test-time fine-tuning where the model was fine-tuned."""
    def one(res: dict, p: str) -> dict:
        h = {"dice_grid": res[p]["dice_grid"], "postprocess": False, "finetune_steps": res.get("finetune_steps", 0),
             "mean": res[p]["mean"], "mean_post": res[p]["mean_post"], "per_class": res[p]["per_class"],
             "per_class_post": res[p]["per_class_post"]}
        if f"{p}_base" in res:
            h |= {"base_mean": res[f"{p}_base"]["mean"], "base_mean_post": res[f"{p}_base"]["mean_post"]}
        return h

    return {kind: {p: one(res, p) for p in PROTOCOLS if p in res} for kind, res in result["models"].items()}


def _table(r: dict, classes, suffix: str) -> list[str]:
    lines = ["| fold | " + " | ".join(classes) + " | mean |", "|---" * (len(classes) + 2) + "|"]
    for f, row in sorted(r["per_fold" + suffix].items(), key=lambda kv: int(kv[0])):
        vals = [row.get(c, float("nan")) * 100 for c in classes]
        lines.append(f"| {f} | " + " | ".join(f"{v:.1f}" for v in vals) + f" | {sum(vals) / len(vals):.1f} |")
    vals = [r["per_class" + suffix].get(c, float("nan")) * 100 for c in classes]
    return lines + ["| **mean** | " + " | ".join(f"**{v:.1f}**" for v in vals)
                    + f" | **{r['mean' + suffix] * 100:.1f}** |", ""]


def markdown(result: dict) -> str:
    grid = result["dice_grid"]
    lines = [f"# Few-shot segmentation on {result['spec']}, Setting {result['setting']}, 1-shot, "
             f"{result['resolution']} px", "", f"Command: `{result['command']}`", "",
             f"Wall time: {result['wall_seconds'] / 60:.1f} min on {result['machine']} "
             f"({result['jobs']} parallel jobs x {result['threads']} torch thread). Dice in %, scored on the "
             f"{grid} label grid; headline without post-processing, the 3D largest component per query volume "
             "beside it; 'before fine-tuning' is the same model without test-time fine-tuning on the support slices.",
             "", "| model | protocol | fine-tuning steps | Dice | Dice + 3D largest component | before fine-tuning |",
             "|---|---|---|---|---|---|"]
    for kind, per in result["headline"].items():
        for protocol, h in per.items():
            before = (f"{100 * h['base_mean']:.1f} ({100 * h['base_mean_post']:.1f})" if "base_mean" in h else "")
            lines.append(f"| {kind} | {protocol} | {h.get('finetune_steps', 0)} | **{100 * h['mean']:.1f}** | "
                         f"{100 * h['mean_post']:.1f} | {before} |")
    lines.append("")
    classes = result["classes"]
    for kind, res in result["models"].items():
        cfg = res["config"]
        lines += [f"## {kind}", "",
                  f"steps {cfg['steps']}, batch {cfg['batch']}, width {cfg['width']}, episode mix superpixel "
                  f"{cfg['mix_superpixel']} / supervised {cfg['mix_supervised']}, models per fold: {res['splits']}; "
                  f"training {sum(res['train_seconds'].values()) / 60:.1f} min; test-time fine-tuning "
                  f"{res.get('finetune_steps', 0)} steps per class and protocol on its support slices, "
                  f"{sum(res.get('finetune_seconds', {}).values()) / 60:.1f} min", ""]
        unsupervised = [k for k, v in res.get("episode_sources", {}).items() if v and "supervised" not in v]
        if cfg["mix_supervised"] > 0 and unsupervised:
            lines += [f"Trained without supervised episodes (too few slices of the other classes): "
                      f"{', '.join(unsupervised)}.", ""]
        for protocol in PROTOCOLS:
            if protocol not in res:
                continue
            r = res[protocol]
            lines += [f"### {protocol} (evaluation {r['seconds']:.0f} s), no post-processing", "",
                      *_table(r, classes, ""), f"### {protocol}, 3D largest component per query volume", "",
                      *_table(r, classes, "_post")]
    for method, ref in result["published"].items():
        lines += [f"Published (EP1, reported, not re-run): {method} " +
                  ", ".join(f"{c} {v:.2f}" for c, v in ref.items()) + ".", ""]
    lines += ["Not like for like with the published methods: here a small network trained from scratch for the steps "
              "above on one CPU thread per fold, at the working resolution above (Dice resampled to the label grid); "
              "they use COCO-pretrained ResNet-101 backbones at 256 px and ~100k episodes.", ""]
    return "\n".join(lines)


def run_setting(setting: int, args, spec, data, folds, trained: dict, t0: float) -> dict:
    """Evaluate every model kind of one setting and write segment_{spec}_setting{N}[_tag].json and .md."""
    result = {"benchmark": "segment_fewshot", "spec": spec.name, "setting": setting, "shots": 1,
              "resolution": args.resolution, "dice_grid": args.dice_grid, "postprocess": False,
              "classes": list(spec.classes), "folds": [f.index for f in folds], "data_key": data.key,
              "command": " ".join([".venv/bin/python benchmarks/segment_fewshot.py", *sys.argv[1:]]),
              "machine": f"{platform.machine()} CPU, {multiprocessing.cpu_count()} cores (shared)",
              "threads": args.threads, "jobs": args.jobs, "torch": torch.__version__, "models": {},
              "published": PUBLISHED.get((spec.name, setting), {})}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"segment_{spec.name}_setting{setting}" + (f"_{args.tag}" if args.tag else "")
    for kind in args.models:
        mine = {(f, names): v for (k, s, f, names), v in trained.items() if k == kind and s == setting}
        result["models"][kind] = evaluate_model(kind, setting, args, data, folds, mine)
        result["headline"] = headline(result)
        result["wall_seconds"] = round(time.time() - t0, 1)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
        (out / f"{stem}.md").write_text(markdown(result))
        print(f"setting {setting} {kind}", {p: (round(h["mean"] * 100, 1), round(h["mean_post"] * 100, 1))
                                            for p, h in result["headline"][kind].items()}, flush=True)
    print(f"wrote {out / stem}.json and .md", flush=True)
    return result


def main(argv: list[str] | None = None) -> dict[int, dict]:
    args = parse_args(argv)
    t0 = time.time()
    spec = load_spec(args.spec)
    data = prepare(spec, args.data, resolution=args.resolution, cache_dir=args.cache)
    wanted = range(spec.n_folds) if args.folds is None else args.folds
    folds = [f for f in make_folds(data.ids, spec.n_folds) if f.index in wanted]
    superpixels(data, cache_dir=args.cache)  # once, before the workers need it
    torch.set_num_threads(args.threads)
    # 1. train every (model, setting, fold, class split)
    tasks = [(kind, s, f.index, names) for s in args.setting for f in folds for kind in args.models
             for names in class_splits(spec, s, args.split, model_config(kind, args).mix_supervised > 0)]
    # 2. as soon as every model of a setting is trained, evaluate it under EP1 and EP2 in this process
    pending = {s: {t for t in tasks if t[1] == s} for s in args.setting}
    trained, results = {}, {}
    for task, value in train_all(tasks, args):
        trained[task] = value
        pending[task[1]].discard(task)
        if not pending[task[1]]:
            results[task[1]] = run_setting(task[1], args, spec, data, folds, trained, t0)
    print(f"done in {(time.time() - t0) / 60:.1f} min")
    return results


if __name__ == "__main__":
    main()
