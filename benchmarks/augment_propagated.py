"""Benchmark: label accuracy of the propagated source on the training volumes; chooses its offsets.

The propagated source (`augment.propagated`) pairs unlabelled slices of the support volume, at `offsets`
from each EP1 support slice, with the support mask carried there by TV-L1 optical flow. At test time it runs
on the test fold's support volume. Here each TRAINING volume of the chosen folds plays that part: its EP1
support slices per class, every candidate at offsets 1..max, the label-free checks, and the Dice of each
propagated mask against the true mask of its slice, next to copying the support mask unchanged (labels are
read for this measurement only). The query and support volumes of a fold are never read.
Writes benchmarks/results/augment_propagated{_tag}.json and .md.

    .venv/bin/python benchmarks/augment_propagated.py --folds 0        # CHAOS, 128 px, about 3 min a fold
    .venv/bin/python benchmarks/augment_propagated.py --phantom --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from augment.config import PropagatedConfig  # noqa: E402
from augment.propagated import propagation_candidates  # noqa: E402
from augment.warped_pairs import PairChecks  # noqa: E402
from segment.data.phantom import write_phantom  # noqa: E402
from segment.data.protocol import ep1_support_indices, make_folds  # noqa: E402
from segment.data.slices import prepare  # noqa: E402
from segment.data.volumes import load_spec  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="../shared/data/chaos_t2", help="data folder (relative: to the repo root)")
    p.add_argument("--spec", default="abd_mri")
    p.add_argument("--resolution", type=int, default=128)
    p.add_argument("--phantom", action="store_true", help="quick mode: 6 phantom volumes at 48 px")
    p.add_argument("--folds", type=int, nargs="+", default=[0])
    p.add_argument("--max-offset", type=int, default=3)
    p.add_argument("--cache", default=".cache/supportforge")
    p.add_argument("--out", default="benchmarks/results")
    p.add_argument("--tag", default="")
    return p.parse_args(argv)


def load_data(args):
    if args.phantom:
        folder = Path(tempfile.mkdtemp(prefix="phantom_")) / "data"
        write_phantom(folder, n_volumes=6, size=48, depth=16, seed=0, n_folds=3)
        args.resolution = 48
        return prepare(load_spec(str(folder / "dataset.toml")), folder, resolution=48, cache_dir=folder.parent / "c")
    return prepare(load_spec(args.spec), ROOT / args.data, resolution=args.resolution, cache_dir=ROOT / args.cache)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2 * (a & b).sum() / total)


def measure_volume(volume, class_id: int, offsets: tuple[int, ...], checks: PairChecks) -> list[dict]:
    """Every candidate of one volume and class as if it were the support volume: propagated and copied Dice."""
    idx = ep1_support_indices(volume.native_labels, class_id, 3)
    truth = volume.labels == class_id                                          # (Z, R, R), measurement only
    masks = torch.from_numpy(truth[idx][:, None].astype(np.float32))
    rows = []
    for cands in propagation_candidates(masks, volume.images, idx, offsets, checks):
        for c in cands:
            rows.append({"offset": abs(c["offset"]), "passed": c["problem"] is None,
                         "propagated": dice(c["mask"], truth[c["slice"]]),
                         "copied": dice(masks[c["support"], 0].numpy(), truth[c["slice"]]),
                         "folded_share": c["folded_share"], "area_ratio": c["area_ratio"]})
    return rows


def summarise(rows: list[dict]) -> dict:
    out = {}
    for d in sorted({r["offset"] for r in rows}):
        at = [r for r in rows if r["offset"] == d]
        ok = [r for r in at if r["passed"]]
        out[d] = {"n": len(at), "share_passed": round(len(ok) / len(at), 3),
                  "propagated_all": round(100 * float(np.mean([r["propagated"] for r in at])), 1),
                  "copied_all": round(100 * float(np.mean([r["copied"] for r in at])), 1),
                  "propagated_passed": round(100 * float(np.mean([r["propagated"] for r in ok])), 1) if ok else None,
                  "copied_passed": round(100 * float(np.mean([r["copied"] for r in ok])), 1) if ok else None}
    return out


def main(argv=None) -> dict:
    args = parse_args(argv)
    t0 = time.time()
    data = load_data(args)
    folds = make_folds(data.ids, data.spec.n_folds)
    config = PropagatedConfig(resolution=data.resolution)
    applied = {f: getattr(config, f)
               for f in ("max_folded_share", "min_area_ratio", "max_area_ratio", "min_fragment_px")}
    checks = PairChecks(**applied)  # optical flow has no registration similarity, so no min_similarity
    offsets = tuple(range(1, args.max_offset + 1))
    rows: dict[str, list[dict]] = {c: [] for c in data.spec.classes}
    volumes = sorted({v for k in args.folds for v in folds[k].train})
    for vid in tqdm(volumes, desc="volumes"):
        vol = data.volume(vid)
        for name in data.spec.classes:
            if (vol.labels == data.spec.class_id(name)).any():
                rows[name] += measure_volume(vol, data.spec.class_id(name), offsets, checks)
    result = {"dataset": data.spec.name, "resolution": data.resolution, "folds": args.folds,
              "training_volumes": volumes, "checks": applied, "default_offsets": list(config.offsets),
              "per_class": {c: summarise(r) for c, r in rows.items()},
              "all": summarise([r for rs in rows.values() for r in rs]), "seconds": round(time.time() - t0, 1)}
    write(result, Path(args.out) if Path(args.out).is_absolute() else ROOT / args.out, args.tag, args.phantom)
    return result


def write(result: dict, out_dir: Path, tag: str, phantom: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"augment_propagated{tag}.json").write_text(json.dumps(result, indent=2))
    lines = [f"# Propagated pairs: label accuracy on the training volumes of folds {result['folds']} "
             f"({result['dataset']}, {result['resolution']} px)", "",
             "Each training volume plays the support volume: Dice (%) of the mask propagated from its EP1 support "
             "slice to the slice at that offset, against the true mask there (labels read for this measurement "
             "only), next to the support mask copied unchanged. 'passed': the candidates that pass the "
             f"label-free checks ({result['checks']}). The source's default offsets are "
             f"{result['default_offsets']}.", "",
             "| class | offset | n | share passed | propagated, passed | copied, passed | propagated, all | "
             "copied, all |", "|---|---|---|---|---|---|---|---|"]
    for name, per in [*result["per_class"].items(), ("all", result["all"])]:
        for d, s in per.items():
            lines.append(f"| {name} | {d} | {s['n']} | {s['share_passed']} | {s['propagated_passed']} | "
                         f"{s['copied_passed']} | {s['propagated_all']} | {s['copied_all']} |")
    lines += ["", f"{len(result['training_volumes'])} volumes, {result['seconds']} s."]
    (out_dir / f"augment_propagated{tag}.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
