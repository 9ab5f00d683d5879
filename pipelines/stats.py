"""Statistics of the ablation: spread over folds and seeds, and paired tests against real-only.

Input rows are one Dice per (protocol, model, arm, class, fold, seed, query volume). Every arm is scored
on the same folds, seeds and query volumes, so arm A and the baseline pair up on (class, fold, seed,
query). The primary test is the two-sided Wilcoxon signed-rank test on those pairs (few pairs, no
normality assumed); the paired t-test is reported beside it. A gain is claimed only when the mean
difference is positive and the Wilcoxon p-value is below alpha.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from scipy import stats

ALL = "all"


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over (fold, seed) units, per class and over all classes.

    A unit's score for a class is its mean over query volumes; its overall score is the mean over classes.
    """
    out = []
    for (protocol, model, arm), group in sorted(_group(rows, ("protocol", "model", "arm")).items()):
        units = _group(group, ("fold", "seed"))
        per_unit = {u: {c: float(np.mean([r["dice"] for r in rs]))
                        for (c,), rs in _group(unit_rows, ("class",)).items()} for u, unit_rows in units.items()}
        classes = sorted({r["class"] for r in group})
        for cls in (*classes, ALL):
            vals = [np.mean(list(u.values())) if cls == ALL else u[cls] for u in per_unit.values()
                    if cls == ALL or cls in u]
            out.append({"protocol": protocol, "model": model, "arm": arm, "class": cls, "mean": float(np.mean(vals)),
                        "std": float(np.std(vals)), "units": len(vals)})
    return out


def paired_tests(rows: list[dict], *, baseline: str, alpha: float = 0.05) -> list[dict]:
    """Each arm minus `baseline`, paired over query volumes, per class and pooled over classes."""
    index = {(r["protocol"], r["model"], r["arm"], r["class"], r["fold"], r["seed"], r["query"]): r["dice"]
             for r in rows}
    out = []
    for (protocol, model, arm), group in sorted(_group(rows, ("protocol", "model", "arm")).items()):
        if arm == baseline:
            continue
        for cls in (*sorted({r["class"] for r in group}), ALL):
            pairs = [(r["dice"], index.get((protocol, model, baseline, r["class"], r["fold"], r["seed"], r["query"])))
                     for r in group if cls == ALL or r["class"] == cls]
            pairs = [(a, b) for a, b in pairs if b is not None]
            out.append({"protocol": protocol, "model": model, "arm": arm, "baseline": baseline, "class": cls,
                        **compare([a for a, _ in pairs], [b for _, b in pairs], alpha=alpha)})
    return out


def compare(arm: list[float], base: list[float], *, alpha: float) -> dict:
    """Paired comparison of two equally long score lists, with a verdict that never overclaims."""
    a, b = np.asarray(arm, dtype=float), np.asarray(base, dtype=float)
    diff = a - b
    n = len(diff)
    result = {"n": n, "mean_diff": float(diff.mean()) if n else float("nan"),
              "wins": int((diff > 0).sum()), "losses": int((diff < 0).sum()),
              "p_wilcoxon": float("nan"), "p_ttest": float("nan")}
    if n < 2 or not np.any(diff):
        result["verdict"] = "no difference" if n >= 2 else "too few pairs"
        return result
    result["p_wilcoxon"] = float(stats.wilcoxon(a, b).pvalue)
    if np.ptp(diff) > 1e-9:
        result["p_ttest"] = float(stats.ttest_rel(a, b).pvalue)
    if result["p_wilcoxon"] < alpha:
        result["verdict"] = "gain" if result["mean_diff"] > 0 else "loss"
    else:
        result["verdict"] = "no significant difference"
    return result
