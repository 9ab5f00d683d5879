"""Benchmark: how much a validation run favours the registered source, whose pairs are slices of the very
training volumes such a run scores.

A validation run (`[protocol] score_on = "training"`) scores each fold's training volumes. The registered
source's pairs are slices of those volumes with label-free masks, so an arm fine-tuned on them has seen part
of what it is scored on (never its labels). This splits every scored cell (fold, seed, class, volume) of a
finished validation run by whether the volume gave that unit a registered pair, in any of its relabelled
sets (one per teacher; from the run's relabel manifests in the stage cache), and gives each arm's mean
difference from the baseline on both parts. Only files are read; nothing is trained or scored. Writes
benchmarks/results/validation_overlap.json and .md.

    .venv/bin/python benchmarks/validation_overlap.py runs/abd_mri_pairs_cpu_validate_conditional_ft100 \
        runs/abd_mri_pairs_cpu_validate_conditional_ft300 runs/abd_mri_pairs_cpu_validate_conditional_rounds
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.outputs import write  # noqa: E402
from pipelines.stats import arm_roles  # noqa: E402

LABEL = re.compile(r"registered(?:, taught by .+)? fold(\d+) s(\d+) (\S+)$")  # older runs' labels omit the teacher
PARTS = ("gave none", "gave pairs")


def registered_volumes(run: Path, cache: Path) -> dict[tuple[int, int, str], set[str]]:
    """(fold, seed, class) -> the volumes that gave any of the run's registered sets of that unit a pair (one per
    teacher: rounds of self-training keep different pairs)."""
    out: dict[tuple[int, int, str], set[str]] = defaultdict(set)
    for r in json.loads((run / "stages.json").read_text())["records"]:
        match = LABEL.match(r["label"]) if r["stage"] == "relabel" else None
        if match:
            manifest = json.loads((cache / "stages" / "relabel" / r["key"] / "set" / "manifest.json").read_text())
            fold, seed, cls = int(match[1]), int(match[2]), match[3]
            out[fold, seed, cls] |= {p["volume"] for p in manifest["pairs"]}
    return dict(out)


def split(run: Path, cache: Path) -> dict:
    results = json.loads((run / "results.json").read_text())
    if results.get("score_on") != "training":
        raise SystemExit(f"{run}: not a validation run (score_on = {results.get('score_on')!r})")
    used = registered_volumes(run, cache)
    dice = {(r["arm"], r["fold"], r["seed"], r["class"], r["query"]): r["dice"] for r in results["rows"]}
    roles = arm_roles(results["rows"])
    baseline, arms = roles.baseline, [a for a in roles.order if a != roles.baseline]
    diffs: dict[tuple[str, str], list[float]] = defaultdict(list)
    for (arm, fold, seed, cls, volume), value in dice.items():
        if arm == baseline:
            continue
        part = "gave pairs" if volume in used.get((fold, seed, cls), set()) else "gave none"
        diffs[arm, part].append(100 * (value - dice[baseline, fold, seed, cls, volume]))
    rows = [{"arm": a, "part": p, "cells": len(diffs[a, p]), "mean_diff": float(np.mean(diffs[a, p]))}
            for a in arms for p in PARTS if diffs[a, p]]
    return {"run": run.name, "baseline": baseline, "rows": rows}


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="folders of finished validation runs")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "supportforge")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "validation_overlap")
    args = parser.parse_args(argv)
    found = [split(run, args.cache) for run in args.runs]  # every run checked before anything is written
    lines = ["# How much a validation run favours the registered source", "",
             "Mean difference from the baseline (Dice points) per scored cell (fold, seed, class, training volume), "
             "split by whether that volume gave any registered set of the unit a pair. Descriptive: no test.", "",
             "| run | arm | cells, volume gave no pair | diff | cells, volume gave pairs | diff |",
             "|---|---|---|---|---|---|"]
    for f in found:
        by = {(r["arm"], r["part"]): r for r in f["rows"]}
        for arm in dict.fromkeys(r["arm"] for r in f["rows"]):
            cells = [by.get((arm, p)) for p in PARTS]
            parts = [f"{c['cells']} | {c['mean_diff']:+.2f}" if c else "0 | -" for c in cells]
            lines.append(f"| {f['run']} | {arm} | {' | '.join(parts)} |")
    write(args.out, found, "\n".join(lines) + "\n")
    return found


if __name__ == "__main__":
    main()
