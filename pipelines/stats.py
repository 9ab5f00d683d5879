"""Statistics of the ablation: spread over folds and seeds, and paired tests with the right unit.

Input rows are one Dice per (protocol, model, arm, class, fold, seed, query volume); `dice` is the headline
score, `role` the arm's role (baseline, control, augmented, diagnostic), which alone decides what is
compared with what. Rows that share a query volume, or share one fine-tune, are not independent, so the unit of every
paired test is the query volume of a fold, (fold, query):
- per-class tests average a unit's Dice over seeds; the all-classes test averages over classes and seeds
  (first over seeds per class, then over classes);
- arm and reference are paired row by row on (class, fold, seed, query) before averaging, so both sides
  of a unit average exactly the same cells.
Per comparison: the mean paired difference over all units with a 95 % bootstrap CI (BCa, seeded), wins and
losses, the exact two-sided Wilcoxon signed-rank p (zero differences dropped from n, as Wilcoxon does, and
counted), and the paired t-test p beside it. p-values are Holm-adjusted over the whole family of
comparisons of a (protocol, model), or, with a primary arm declared before the run, over its primary
comparisons and, gated by them, over the rest (`paired_tests`); a gain or loss is claimed only at adjusted
p < alpha with a CI that excludes 0 on the same side as the mean difference.

An arm whose mask-consistency filter kept zero synthetic pairs in a (fold, seed, class) unit (row field
`synthetic_pairs` = 0) is not augmented there: those cells leave its tests, with a note saying so.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from scipy import stats

ALL = "all"
UNIT = "query volume of a fold"
DECIMALS = 12  # differences are rounded to this many decimals: float noise of averaging makes no ties or zeros
EXACT_LIMIT = 50  # the exact Wilcoxon distribution is used up to this many non-zero units
FLIP_LIMIT = 9999  # with ties, every sign flip is enumerated while there are at most this many


@dataclass(frozen=True)
class Roles:
    """Which arm plays which part in the tests, from each row's `role` (set by the arm's config), never
    from its name: baseline (the reference of every test), controls (the references of the augmented
    arms), augmented arms, and diagnostic arms (a ceiling: never tested, so never in a verdict or primary)."""

    baseline: str | None
    controls: tuple[str, ...]
    augmented: tuple[str, ...]
    diagnostic: tuple[str, ...] = ()
    order: tuple[str, ...] = ()  # every arm, in the order given

    def comparisons(self) -> list[tuple[str, str]]:
        """(arm, reference): every method arm against the baseline, then each augmented arm against each
        control. Diagnostic arms are left out: they are no method, and would only enlarge the Holm family."""
        out = [(a, self.baseline) for a in self.order
               if self.baseline and a != self.baseline and a not in self.diagnostic]
        return out + [(a, c) for c in self.controls for a in self.augmented]

    def candidates(self) -> tuple[str, ...]:
        """Arms that may be the primary comparison: the augmented arms (the controls only where there is
        none); never a diagnostic arm."""
        return tuple(self.augmented) or tuple(self.controls)


def arm_roles(rows: Iterable[dict]) -> Roles:
    """The roles of the arms in `rows` (order of first appearance kept); one role per arm name."""
    roles: dict[str, str] = {}
    for r in rows:
        if roles.setdefault(r["arm"], r["role"]) != r["role"]:
            raise ValueError(f"arm {r['arm']!r} has rows with roles {roles[r['arm']]!r} and {r['role']!r}")
    baselines = [a for a, role in roles.items() if role == "baseline"]
    if len(baselines) > 1:
        raise ValueError(f"rows name {len(baselines)} baseline arms {baselines}; a report has one")
    return Roles(baseline=baselines[0] if baselines else None,
                 controls=tuple(a for a, role in roles.items() if role == "control"),
                 augmented=tuple(a for a, role in roles.items() if role == "augmented"),
                 diagnostic=tuple(a for a, role in roles.items() if role == "diagnostic"), order=tuple(roles))


def _group(rows: list[dict], keys: tuple[str, ...]) -> dict[tuple, list[dict]]:
    out: dict[tuple, list[dict]] = defaultdict(list)
    for r in rows:
        out[tuple(r[k] for k in keys)].append(r)
    return out


def _spread(rows: list[dict], value: str) -> list[dict]:
    """Mean and std over (fold, seed) units of `value`, per class and over all classes."""
    units = _group(rows, ("fold", "seed"))
    per_unit = {u: {c: float(np.mean([r[value] for r in rs])) for (c,), rs in _group(unit_rows, ("class",)).items()}
                for u, unit_rows in units.items()}
    out = []
    for cls in (*sorted({r["class"] for r in rows}), ALL):
        vals = [np.mean(list(u.values())) if cls == ALL else u[cls] for u in per_unit.values()
                if cls == ALL or cls in u]
        out.append({"class": cls, "mean": float(np.mean(vals)), "std": float(np.std(vals)), "units": len(vals)})
    return out


def summarise(rows: list[dict]) -> list[dict]:
    """Mean and standard deviation over (fold, seed) units, per class and over all classes.

    A unit's score for a class is its mean over query volumes; its overall score is the mean over classes.
    Where every row of an arm has `dice_post` (post-processed Dice), its mean and std ride along.
    """
    out = []
    for (protocol, model, arm), group in sorted(_group(rows, ("protocol", "model", "arm")).items()):
        cells = _spread(group, "dice")
        if all(r.get("dice_post") is not None for r in group):
            for cell, post in zip(cells, _spread(group, "dice_post")):
                cell |= {"mean_post": post["mean"], "std_post": post["std"]}
        out += [{"protocol": protocol, "model": model, "arm": arm, **cell} for cell in cells]
    return out


def zero_pool_cells(rows: list[dict]) -> tuple[dict[tuple, set], dict[tuple, set]]:
    """Per (model, arm): the (class, fold, seed) cells with a fine-tune pool count, and those where the
    filter kept zero synthetic pairs. Rows without `synthetic_pairs` (or None: no synthetic source) count
    in neither."""
    counted: dict[tuple, set] = defaultdict(set)
    zero: dict[tuple, set] = defaultdict(set)
    for r in rows:
        if r.get("synthetic_pairs") is None:
            continue
        cell = (r["class"], r["fold"], r["seed"])
        counted[r["model"], r["arm"]].add(cell)
        if r["synthetic_pairs"] == 0:
            zero[r["model"], r["arm"]].add(cell)
    return counted, zero


def pool_notes(rows: list[dict]) -> list[str]:
    """One line per (model, arm) whose filter kept zero synthetic pairs somewhere."""
    counted, zero = zero_pool_cells(rows)
    notes = []
    for (model, arm), cells in sorted(zero.items()):
        total = len(counted[model, arm])
        tail = "not tested" if len(cells) == total else "those cells are left out of its tests"
        notes.append(f"arm {arm} ({model}): filter kept 0 pairs in {len(cells)} of {total} (fold, seed, class) "
                     f"units; {tail}")
    return notes


def unit_differences(arm_rows: list[dict], ref_rows: list[dict], *, cls: str,
                     excluded: set[tuple] = frozenset()) -> np.ndarray:
    """Arm minus reference per (fold, query) unit, averaged over seeds (and classes for `ALL`).

    Cells are paired on (class, fold, seed, query) first; (class, fold, seed) cells in `excluded` leave
    both sides. Units come out sorted by (fold, query).
    """
    ref = {(r["class"], r["fold"], r["seed"], r["query"]): r["dice"] for r in ref_rows}
    cells: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))  # unit -> class -> diffs
    for r in arm_rows:
        key = (r["class"], r["fold"], r["seed"], r["query"])
        if (cls == ALL or r["class"] == cls) and key in ref and key[:3] not in excluded:
            cells[r["fold"], r["query"]][r["class"]].append(r["dice"] - ref[key])
    return np.array([np.mean([np.mean(per_seed) for per_seed in cells[u].values()])
                     for u in sorted(cells, key=lambda u: (u[0], str(u[1])))], dtype=float)  # (units,)


def bootstrap_ci(diffs: np.ndarray, *, seed: int) -> tuple[float | None, float | None, str | None]:
    """95 % CI of the mean difference: BCa from n = 3, percentile at n = 2, none below; seeded."""
    n = len(diffs)
    if n < 2:
        return None, None, None
    if np.ptp(diffs) == 0:  # every resample has the same mean
        return float(diffs[0]), float(diffs[0]), "degenerate"
    method = "BCa" if n >= 3 else "percentile"
    res = stats.bootstrap((diffs,), np.mean, method=method, confidence_level=0.95, n_resamples=9999,
                          random_state=np.random.default_rng(seed))
    low, high = res.confidence_interval
    if not (np.isfinite(low) and np.isfinite(high)):  # BCa can fail on near-degenerate data
        method = "percentile"
        res = stats.bootstrap((diffs,), np.mean, method=method, confidence_level=0.95, n_resamples=9999,
                              random_state=np.random.default_rng(seed))
        low, high = res.confidence_interval
    return float(low), float(high), method


def describe(diffs: np.ndarray, *, seed: int) -> dict:
    """Everything a paired comparison reports about its unit differences, before multiplicity adjustment."""
    diffs = np.round(np.asarray(diffs, dtype=float), DECIMALS) + 0.0  # (units,); float noise is no tie-breaker
    nonzero = diffs[diffs != 0]
    low, high, ci_method = bootstrap_ci(diffs, seed=seed)
    out = {"unit": UNIT, "units": len(diffs), "n": len(nonzero), "dropped_zeros": int(len(diffs) - len(nonzero)),
           "mean_diff": float(diffs.mean()) if len(diffs) else None, "ci_low": low, "ci_high": high,
           "ci_method": ci_method, "wins": int((diffs > 0).sum()), "losses": int((diffs < 0).sum()),
           "p_wilcoxon": None, "wilcoxon_method": None, "p_ttest": None}
    if len(nonzero):
        out["p_wilcoxon"], out["wilcoxon_method"] = wilcoxon_p(nonzero)
    if len(diffs) >= 2 and np.ptp(diffs) > 0:
        out["p_ttest"] = float(stats.ttest_1samp(diffs, 0.0).pvalue)
    return out


def wilcoxon_p(nonzero: np.ndarray) -> tuple[float, str]:
    """Two-sided signed-rank p of non-zero differences, exact wherever it can be computed.

    Without ties: the exact null distribution. With tied |differences| the exact distribution is the
    enumeration of all 2**n sign flips, feasible up to n = 13; beyond, the normal approximation.
    """
    n, ties = len(nonzero), len(np.unique(np.abs(nonzero))) < len(nonzero)
    if not ties and n <= EXACT_LIMIT:
        return float(stats.wilcoxon(nonzero, method="exact").pvalue), "exact"
    if ties and 2 ** n <= FLIP_LIMIT:
        flips = stats.PermutationMethod(n_resamples=FLIP_LIMIT)  # more resamples than flips: all are enumerated
        return float(stats.wilcoxon(nonzero, method=flips).pvalue), "exact (sign flips, ties)"
    return float(stats.wilcoxon(nonzero, method="asymptotic").pvalue), "asymptotic"


def holm(pvalues: list[float | None]) -> list[float | None]:
    """Holm's step-down adjustment; None (untested) stays None and does not count in the family."""
    order = sorted((i for i, p in enumerate(pvalues) if p is not None), key=lambda i: pvalues[i])
    out: list[float | None] = [None] * len(pvalues)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (len(order) - rank) * pvalues[i]))
        out[i] = running
    return out


def verdict(test: dict, *, alpha: float) -> str:
    """gain / loss only at Holm-adjusted p < alpha with the CI on the side of the mean difference."""
    if test["units"] < 2:
        return "too few units"
    if test["n"] == 0:
        return "no difference"
    p, mean = test["p_holm"], test["mean_diff"]
    if p is not None and p < alpha and test["ci_low"] is not None:
        if mean > 0 and test["ci_low"] > 0:
            return "gain"
        if mean < 0 and test["ci_high"] < 0:
            return "loss"
    return "no significant difference"


def _family(rows: list[dict], protocol: str, model: str, *, seed: int) -> list[dict]:
    """Every comparison of one (protocol, model), unadjusted, in role order."""
    by_arm = _group(rows, ("arm",))
    roles = arm_roles(rows)
    role_of = {r["arm"]: r["role"] for r in rows}
    counted, zero = zero_pool_cells(rows)
    classes = sorted({r["class"] for r in rows})
    out = []
    for arm, ref in roles.comparisons():
        excluded = zero.get((model, arm), set()) | zero.get((model, ref), set())
        untested = [a for a in (arm, ref) if counted.get((model, a)) and zero.get((model, a)) == counted[model, a]]
        if untested:
            continue  # an arm without synthetic pairs anywhere is no augmented arm: its note says so
        for cls in (classes if len(classes) > 1 else []) + [ALL]:
            diffs = unit_differences(by_arm[(arm,)], by_arm[(ref,)], cls=cls, excluded=excluded)
            out.append({"protocol": protocol, "model": model, "arm": arm, "vs": ref, "class": cls,
                        "role": role_of[arm], "vs_role": role_of[ref],
                        "primary": False, **describe(diffs, seed=seed)})
    return out


def _adjust(family: list[dict], *, alpha: float, name: str, gate: float = 0.0) -> None:
    """Holm over `family`, each adjusted p raised to at least `gate`; the verdicts follow."""
    for t, p in zip(family, holm([t["p_wilcoxon"] for t in family])):
        t["p_holm"] = None if p is None else max(p, gate)
        t["family"] = name
        t["verdict"] = verdict(t, alpha=alpha)


def paired_tests(rows: list[dict], *, alpha: float = 0.05, seed: int = 0,
                 primary: str | None = None) -> tuple[list[dict], list[str]]:
    """Every paired comparison, Holm-adjusted per (protocol, model), with the primary one marked; and the
    notes on arms (or cells) left untested because their filter kept zero synthetic pairs.

    Without `primary`, the primary comparison of a (protocol, model) is its best tested augmented arm against
    the baseline over all classes (the highest mean difference), chosen after the run, and one Holm family
    holds every comparison (`family` = "all"). A `primary` arm is declared before the run: its all-classes
    comparisons with the baseline and the controls form the "primary" family, Holm-adjusted among themselves;
    every other comparison is "secondary", Holm-adjusted among the secondary ones and gated by the primary
    family (serial gatekeeping: a secondary p is raised to the largest primary one, so nothing secondary is
    claimed unless every primary p is below alpha). The family-wise error stays at alpha over both.
    """
    tests, notes = [], pool_notes(rows)
    for (protocol, model), group in _group(rows, ("protocol", "model")).items():
        family = _family(group, protocol, model, seed=seed)
        roles = arm_roles(group)
        if primary is None:
            _adjust(family, alpha=alpha, name="all")
            candidates = [t for t in family if t["vs"] == roles.baseline and t["class"] == ALL
                          and t["arm"] in roles.candidates()]
            if candidates:
                max(candidates, key=lambda t: -np.inf if t["mean_diff"] is None else t["mean_diff"])["primary"] = True
            tests += family
            continue
        if primary not in roles.augmented:
            raise ValueError(f"the declared primary arm {primary!r} is not an augmented arm of {protocol} {model}; "
                             f"augmented arms: {list(roles.augmented)}")
        first = [t for t in family if t["arm"] == primary and t["class"] == ALL]
        _adjust(first, alpha=alpha, name="primary")
        gate = max((t["p_holm"] for t in first if t["p_holm"] is not None), default=1.0)
        _adjust([t for t in family if all(t is not f for f in first)], alpha=alpha, name="secondary", gate=gate)
        for t in first:
            t["primary"] = t["vs"] == roles.baseline
        if not first:
            notes.append(f"{protocol} {model}: the declared primary arm {primary!r} has no test (no synthetic pairs "
                         f"anywhere), so the gate is closed and no secondary comparison is claimed")
        tests += family
    return tests, notes


def gap_closed(summary: list[dict]) -> list[dict]:
    """Per (protocol, model), each method arm's share of the gap to each diagnostic arm (the ceiling), on the
    all-classes mean: (arm - baseline) / (ceiling - baseline); None where the gap is <= 0 (no headroom).

    `summary` holds `summarise` rows with `role` added; the means are over the same (fold, seed) units as
    the summary table.
    """
    out = []
    for (protocol, model), group in _group([r for r in summary if r["class"] == ALL], ("protocol", "model")).items():
        mean = {r["arm"]: r["mean"] for r in group}
        role = {r["arm"]: r["role"] for r in group}
        base = [a for a in mean if role[a] == "baseline"]
        if not base:
            continue
        for ceiling in (a for a in mean if role[a] == "diagnostic"):
            gap = mean[ceiling] - mean[base[0]]
            for arm in (a for a in mean if role[a] in ("control", "augmented")):
                share = (mean[arm] - mean[base[0]]) / gap if gap > 0 else None
                out.append({"protocol": protocol, "model": model, "arm": arm, "role": role[arm], "baseline": base[0],
                            "ceiling": ceiling, "mean": mean[arm], "baseline_mean": mean[base[0]],
                            "ceiling_mean": mean[ceiling], "gap": gap, "share_of_gap_closed": share})
    return out


def target_checks(tests: list[dict], ceiling: list[dict], *, over_baseline: float | None,
                  over_control: float | None) -> list[dict]:
    """Per (protocol, model), whether the primary arm (declared, or the best one) reached the gains asked of it
    over the baseline and over each control, in Dice points, and by how much it fell short.

    A target is met only by a claimed gain (`verdict` "gain": adjusted p < alpha, CI above 0) of at least the
    asked size. `ceiling_gain` is what each diagnostic arm gains over the baseline (from `gap_closed`): a target
    above it asks more of the method than true labels gave.
    """
    asked = {"baseline": over_baseline, "control": over_control}
    out = []
    for t in (t for t in tests if t["primary"] and t["class"] == ALL):
        arm_tests = [u for u in tests if (u["protocol"], u["model"], u["arm"], u["class"]) ==
                     (t["protocol"], t["model"], t["arm"], ALL)]
        ceilings = {g["ceiling"]: 100 * g["gap"] for g in ceiling
                    if (g["protocol"], g["model"], g["arm"]) == (t["protocol"], t["model"], t["arm"])}
        for u in arm_tests:
            target = asked.get(u["vs_role"])
            if target is None:
                continue
            gain = None if u["mean_diff"] is None else 100 * u["mean_diff"]
            met = u["verdict"] == "gain" and gain is not None and gain >= target
            out.append({"protocol": u["protocol"], "model": u["model"], "arm": u["arm"], "vs": u["vs"],
                        "vs_role": u["vs_role"], "target": target, "gain": gain, "ci_low": u["ci_low"],
                        "ci_high": u["ci_high"], "p_holm": u["p_holm"], "verdict": u["verdict"], "met": met,
                        "short_by": None if met or gain is None else max(target - gain, 0.0),
                        "ceiling_gain": ceilings if u["vs_role"] == "baseline" else {}})
    return out
