"""Benchmark: how far two finished runs of the same experiment agree, per arm and per gain.

Two runs with the same config, seeds and query volumes (a rerun on another machine, say) should give the same
scores; floating-point differences grown over training make them differ. This pairs the runs' units (a fold's
query volume, Dice averaged over the classes and seeds both runs scored) and gives, for every arm both ran, each
run's mean, the correlation of the per-unit Dice and the mean absolute difference; and for every other arm, its
gain over the baseline in each run and the correlation of the per-unit gains. A gain whose per-unit values agree
poorly between runs is measured with training noise that a paired test within one run does not see. Only files
are read. Writes benchmarks/results/run_agreement.json and .md.

    .venv/bin/python benchmarks/run_agreement.py \
        benchmarks/results/abd_mri_ablation/pairs_cpu_128px_landed_conditional_rounds \
        benchmarks/results/abd_mri_ablation/rerun_conditional_rounds
"""
from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.outputs import write  # noqa: E402
from pipelines.stats import arm_roles  # noqa: E402


def unit_dice(rows: list[dict], cells: set[tuple]) -> dict[str, dict[tuple[int, str], float]]:
    """arm -> (fold, query) -> mean Dice (%) over the classes and seeds of `cells` (protocol, arm, fold, seed,
    class, query)."""
    per: dict[str, dict[tuple[int, str], list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        if (r["protocol"], r["arm"], r["fold"], r["seed"], r["class"], r["query"]) in cells:
            per[r["arm"]][r["fold"], r["query"]].append(100 * r["dice"])
    return {arm: {u: float(np.mean(v)) for u, v in units.items()} for arm, units in per.items()}


def _cells(rows: list[dict]) -> set[tuple]:
    return {(r["protocol"], r["arm"], r["fold"], r["seed"], r["class"], r["query"]) for r in rows}


def compare(first: Path, second: Path) -> dict:
    """The agreement of two runs' results.json over the cells both scored; refuses runs that share no cell or
    whose baselines differ."""
    a, b = (json.loads((run / "results.json").read_text())["rows"] for run in (first, second))
    shared = _cells(a) & _cells(b)
    if not shared:
        raise SystemExit(f"{first} and {second} share no scored cell (protocol, arm, fold, seed, class, query)")
    roles, base_b = arm_roles(a), arm_roles(b).baseline
    base_a = roles.baseline
    if base_a != base_b or base_a is None:
        raise SystemExit(f"{first} and {second} need the same baseline arm: {base_a!r} against {base_b!r}")
    da, db = unit_dice(a, shared), unit_dice(b, shared)
    units = sorted(da[base_a])
    arms = [arm for arm in roles.order if arm in da and arm in db and sorted(da[arm]) == units]

    def agreement(x: np.ndarray, y: np.ndarray) -> dict:
        return {"first": float(x.mean()), "second": float(y.mean()), "correlation": float(np.corrcoef(x, y)[0, 1]),
                "mean_abs_diff": float(np.abs(x - y).mean())}

    dice = {arm: (np.array([da[arm][u] for u in units]), np.array([db[arm][u] for u in units])) for arm in arms}
    base = dice[base_a]
    return {"first": str(first), "second": str(second), "baseline": base_a, "units": len(units),
            "seeds": sorted({c[3] for c in shared}),
            "arms": [{"arm": arm, **agreement(*dice[arm])} for arm in arms],
            "gains": [{"arm": arm, **agreement(dice[arm][0] - base[0], dice[arm][1] - base[1])}
                      for arm in arms if arm != base_a]}


def markdown(found: dict) -> str:
    lines = ["# How far two runs of one experiment agree", "",
             f"First: `{found['first']}`. Second: `{found['second']}`. Unit: a fold's query volume "
             f"(n = {found['units']}), Dice (%) averaged over the classes and seeds {found['seeds']} both runs "
             "scored. Descriptive: no test.", "",
             "| arm | first | second | correlation per unit | mean abs. difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['first']:.1f} | {r['second']:.1f} | {r['correlation']:.2f} | "
              f"{r['mean_abs_diff']:.2f} |" for r in found["arms"]]
    lines += ["", f"Gains over {found['baseline']}:", "",
              "| arm | first | second | correlation per unit | mean abs. difference |", "|---|---|---|---|---|"]
    lines += [f"| {r['arm']} | {r['first']:+.2f} | {r['second']:+.2f} | {r['correlation']:.2f} | "
              f"{r['mean_abs_diff']:.2f} |" for r in found["gains"]]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("first", type=Path, help="folder with a finished run's results.json")
    parser.add_argument("second", type=Path, help="folder with another run of the same experiment")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "run_agreement")
    args = parser.parse_args(argv)
    found = compare(args.first, args.second)  # checked before anything is written
    write(args.out, found, markdown(found))
    return found


if __name__ == "__main__":
    main()
