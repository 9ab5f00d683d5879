"""Benchmark: a paired test of one run's arm against another run's arm, on the cells both runs scored.

Two variants of a source cannot share a run when they differ in its [generators.NAME] section, which a run has
once: propagated pairs with and without other subjects' contrast, say. Their runs are comparable arm against arm
only if they read the same models, so the runs' baseline arm must score the same Dice in every cell both scored;
otherwise the script refuses, since the difference would mix training noise into the test. Differences are taken
per (fold, query volume) unit, over seeds, then classes (`pipelines.stats.unit_differences`), with the run's own
statistics: mean, 95 % bootstrap CI, wins and losses, Wilcoxon p. One comparison per class and for all classes,
unadjusted: the script tests what it is asked, not a family. Only files are read. Writes
benchmarks/results/arm_versus_arm.json and .md (or --out).

    .venv/bin/python benchmarks/arm_versus_arm.py \
        benchmarks/results/abd_mri_ablation/pairs_cpu_128px_landed_contrast "propagated, other subjects' contrast" \
        benchmarks/results/abd_mri_ablation/pairs_cpu_128px_landed_rounds propagated
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.outputs import write  # noqa: E402
from pipelines.stats import ALL, UNIT, arm_roles, describe, unit_differences  # noqa: E402

CELL = ("protocol", "model", "fold", "seed", "class", "query")


def _cell(row: dict) -> tuple:
    return tuple(row[k] for k in CELL)


def _rows(run: Path, arm: str) -> tuple[list[dict], list[dict]]:
    """The rows of `arm` and of the baseline arm in `run`'s results.json."""
    rows = json.loads((run / "results.json").read_text())["rows"]
    roles = arm_roles(rows)
    if arm not in roles.order:
        raise SystemExit(f"{run} has no arm {arm!r}; its arms: {list(roles.order)}")
    if roles.baseline is None:
        raise SystemExit(f"{run} has no baseline arm to check that it read the same models")
    return [r for r in rows if r["arm"] == arm], [r for r in rows if r["arm"] == roles.baseline]


def compare(first: Path, first_arm: str, second: Path, second_arm: str) -> dict:
    """`first_arm` minus `second_arm` per unit, for every (protocol, model) and class both scored."""
    arm_a, base_a = _rows(first, first_arm)
    arm_b, base_b = _rows(second, second_arm)
    dice_a = {_cell(r): r["dice"] for r in base_a}
    dice_b = {_cell(r): r["dice"] for r in base_b}
    shared = dice_a.keys() & dice_b.keys()
    if not shared:
        raise SystemExit(f"{first} and {second} share no baseline cell (protocol, model, fold, seed, class, query)")
    differ = sum(abs(dice_a[c] - dice_b[c]) > 1e-9 for c in shared)
    if differ:
        raise SystemExit(f"the baselines of {first} and {second} differ in {differ} of {len(shared)} shared cells: "
                         f"the runs did not read the same models, so their arms cannot be paired")
    arm_a = [r for r in arm_a if _cell(r) in shared]
    arm_b = [r for r in arm_b if _cell(r) in shared]
    tests = []
    for pm in sorted({_cell(r)[:2] for r in arm_a} & {_cell(r)[:2] for r in arm_b}):  # (protocol, model)
        a = [r for r in arm_a if _cell(r)[:2] == pm]
        b = [r for r in arm_b if _cell(r)[:2] == pm]
        for cls in (*sorted({r["class"] for r in a}), ALL):
            diffs = 100 * unit_differences(a, b, cls=cls)  # (units,) Dice points
            tests.append({"protocol": pm[0], "model": pm[1], "class": cls, **describe(diffs, seed=0)})
    if not tests:
        raise SystemExit(f"{first_arm!r} and {second_arm!r} share no scored cell")
    return {"first": str(first), "first_arm": first_arm, "second": str(second), "second_arm": second_arm,
            "unit": UNIT, "baseline_cells": len(shared), "seeds": sorted({c[3] for c in shared}), "tests": tests}


def _num(x: float | None, fmt: str) -> str:
    return "" if x is None else format(x, fmt)


def markdown(found: dict) -> str:
    lines = [f"# {found['first_arm']} against {found['second_arm']}", "",
             f"First: `{found['first']}`. Second: `{found['second']}`. Both runs' baselines score the same in all "
             f"{found['baseline_cells']} shared cells (the same models). Unit: {found['unit']}; seeds "
             f"{found['seeds']}. Unadjusted.", "",
             "| protocol | model | class | units | mean diff | 95 % CI | wins/losses | p (Wilcoxon) |",
             "|---|---|---|---|---|---|---|---|"]
    lines += [f"| {t['protocol']} | {t['model']} | {t['class']} | {t['units']} | {_num(t['mean_diff'], '+.2f')} | "
              f"[{_num(t['ci_low'], '.2f')}, {_num(t['ci_high'], '.2f')}] | {t['wins']}/{t['losses']} | "
              f"{_num(t['p_wilcoxon'], '.3g')} |" for t in found["tests"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="folder with a finished run's results.json")
    parser.add_argument("first_arm")
    parser.add_argument("second", type=Path, help="folder with another run that read the same models")
    parser.add_argument("second_arm")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "arm_versus_arm")
    args = parser.parse_args(argv)
    found = compare(args.first, args.first_arm, args.second, args.second_arm)  # checked before anything is written
    write(args.out, found, markdown(found))
    return found


if __name__ == "__main__":
    main()
