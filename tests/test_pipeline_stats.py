"""Ablation statistics: the query volume of a fold as the unit, Holm adjustment, bootstrap CIs, zero pools."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.report import verdict_lines
from pipelines.stats import (ALL, arm_roles, bootstrap_ci, describe, gap_closed, holm, paired_tests, summarise,
                             target_checks)


ROLE = {"real-only": "baseline", "classical": "control"}  # the role of the test arms named so; others: augmented


def _rows(arm: str, diff, *, folds=(0, 1), queries=("1", "2"), classes=("x", "y"), seeds=(0, 1), role: str | None = None,
          **extra) -> list[dict]:
    """One row per (class, fold, seed, query); every arm shares the same base scores, plus `diff(c, f, s, q)`."""
    role = role or ROLE.get(arm, "augmented")
    rows = []
    for f in folds:
        for qi, q in enumerate(queries):
            for ci, c in enumerate(classes):
                for s in seeds:
                    base = 0.3 + 0.1 * f + 0.05 * qi + 0.02 * ci + 0.01 * s
                    rows.append({"protocol": "EP1", "model": "m", "arm": arm, "role": role, "class": c, "fold": f, "seed": s,
                                 "query": q, "dice": base + diff(c, f, s, qi), **extra})
    return rows


def _test(tests: list[dict], arm: str, cls: str = ALL, vs: str = "real-only") -> dict:
    return next(t for t in tests if t["arm"] == arm and t["class"] == cls and t["vs"] == vs)


def _designed(c: str, f: int, s: int, q: int) -> float:
    """x: 0.01 (1 + 2f + q) + 0.02 s; y: the same + 0.04."""
    return 0.01 * (1 + 2 * f + q) + 0.02 * s + (0.04 if c == "y" else 0.0)


def test_unit_averages_classes_and_seeds_per_fold_and_query():
    # 2 folds x 2 queries x 2 classes x 2 seeds = 16 rows per arm; the all-classes unit differences are
    # 0.01 (4 + 2f + q): 0.04, 0.05, 0.06, 0.07 (mean 0.055); class x alone: 0.02 .. 0.05 (mean 0.035)
    tests, notes = paired_tests(_rows("real-only", lambda *a: 0.0) + _rows("aug", _designed))
    pooled, x = _test(tests, "aug"), _test(tests, "aug", "x")
    assert (pooled["units"], pooled["n"], pooled["dropped_zeros"]) == (4, 4, 0) and notes == []
    assert pooled["mean_diff"] == pytest.approx(0.055) and (pooled["wins"], pooled["losses"]) == (4, 0)
    assert pooled["p_wilcoxon"] == pytest.approx(2 / 16) and pooled["wilcoxon_method"] == "exact"
    assert x["n"] == 4 and x["mean_diff"] == pytest.approx(0.035)
    assert _test(tests, "aug", "y")["mean_diff"] == pytest.approx(0.075)
    assert pooled["unit"] == "query volume of a fold"


def test_classes_sharing_a_query_volume_are_one_unit_not_many():
    # the old pooling paired 2 classes x 2 folds x 2 queries = 8 rows as independent (n = 8, p = 0.0078);
    # they are 4 query volumes, so n = 4 and the smallest possible exact p is 0.125
    rows = _rows("real-only", lambda *a: 0.0, seeds=(0,)) + _rows("aug", lambda *a: 0.03, seeds=(0,))
    pooled = _test(paired_tests(rows)[0], "aug")
    assert pooled["units"] == 4 and pooled["n"] == 4 and pooled["p_wilcoxon"] == pytest.approx(0.125)
    assert pooled["wilcoxon_method"] == "exact (sign flips, ties)"  # four equal differences: no normal approximation
    assert pooled["verdict"] == "no significant difference"


def test_holm_matches_a_hand_computed_example():
    # sorted: 0.005 x 4 = 0.02, 0.01 x 3 = 0.03, 0.03 x 2 = 0.06, 0.04 x 1 = 0.04 -> kept monotone at 0.06
    assert holm([0.01, 0.04, None, 0.03, 0.005]) == pytest.approx([0.03, 0.06, None, 0.06, 0.02])
    assert holm([0.6, 0.7]) == [1.0, 1.0] and holm([None]) == [None] and holm([0.2]) == [0.2]


def test_zero_differences_are_dropped_from_n_and_counted():
    out = describe(np.array([0.1, 0.0, 0.2, 0.0, 0.3, 0.15]), seed=0)
    assert (out["units"], out["n"], out["dropped_zeros"]) == (6, 4, 2)
    assert out["p_wilcoxon"] == pytest.approx(2 / 16)  # exact, on the 4 non-zero differences
    assert out["mean_diff"] == pytest.approx(0.75 / 6)  # over every unit, zeros included
    # in the pipeline: fold 1's query volumes score the same in both arms
    rows = _rows("real-only", lambda *a: 0.0) + _rows("aug", lambda c, f, s, q: 0.0 if f == 1 else 0.02 + 0.01 * q)
    pooled = _test(paired_tests(rows)[0], "aug")
    assert (pooled["units"], pooled["n"], pooled["dropped_zeros"], pooled["wins"]) == (4, 2, 2, 2)
    everything_equal = _test(paired_tests(_rows("real-only", lambda *a: 0.0) + _rows("aug", lambda *a: 0.0))[0], "aug")
    assert everything_equal["n"] == 0 and everything_equal["p_wilcoxon"] is None
    assert everything_equal["verdict"] == "no difference"


def test_bootstrap_ci_contains_the_mean_and_is_seeded():
    diffs = np.array([0.02, -0.01, 0.05, 0.03, 0.00, 0.04, 0.01, -0.02])
    low, high, method = bootstrap_ci(diffs, seed=3)
    assert low < diffs.mean() < high and method == "BCa"
    assert bootstrap_ci(diffs, seed=3) == (low, high, method)
    assert bootstrap_ci(np.array([0.1, 0.3]), seed=0)[2] == "percentile"
    assert bootstrap_ci(np.array([0.1]), seed=0) == (None, None, None)
    assert bootstrap_ci(np.array([0.2, 0.2, 0.2]), seed=0) == (0.2, 0.2, "degenerate")
    single = describe(np.array([0.1]), seed=0)
    assert single["ci_low"] is None and single["p_ttest"] is None and single["p_wilcoxon"] == 1.0


def test_verdict_uses_holm_adjusted_p():
    # 3 folds x 2 queries, every difference positive: exact p = 2 / 64 = 0.03125 for each arm
    kw = {"folds": (0, 1, 2), "classes": ("x",), "seeds": (0,)}
    base, gain = _rows("real-only", lambda *a: 0.0, **kw), (lambda c, f, s, q: 0.02 + 0.01 * f + 0.005 * q)
    one, _ = paired_tests(base + _rows("ddpm", gain, **kw))
    assert _test(one, "ddpm")["p_holm"] == pytest.approx(1 / 32) and _test(one, "ddpm")["verdict"] == "gain"
    two, _ = paired_tests(base + _rows("ddpm", gain, **kw) + _rows("gan", gain, **kw))
    t = _test(two, "ddpm")
    assert t["p_wilcoxon"] == pytest.approx(1 / 32) and t["p_holm"] == pytest.approx(1 / 16)
    assert t["verdict"] == "no significant difference" and t["ci_low"] > 0
    lines = verdict_lines(two)
    assert len(lines) == 2 and all("did not help" in line and "Holm-adjusted p = 0.0625" in line for line in lines)
    assert "beats" in verdict_lines(one)[0]


def test_primary_is_the_best_augmented_arm_and_generators_meet_the_control():
    rows = (_rows("real-only", lambda *a: 0.0) + _rows("classical", lambda *a: 0.01)
            + _rows("ddpm", _designed) + _rows("gan", lambda *a: -0.01))
    tests, _ = paired_tests(rows)
    assert [(t["arm"], t["vs"]) for t in tests if t["primary"]] == [("ddpm", "real-only")]
    assert {(t["arm"], t["vs"]) for t in tests} == {("classical", "real-only"), ("ddpm", "real-only"),
                                                     ("gan", "real-only"), ("ddpm", "classical"), ("gan", "classical")}
    assert len(tests) == 5 * 3  # per class and all classes; Holm runs over all 15
    assert sum(t["p_holm"] == pytest.approx(min(1.0, 15 * t["p_wilcoxon"])) for t in tests) >= 1
    strong_control = (_rows("real-only", lambda *a: 0.0) + _rows("classical", lambda *a: 0.5)
                      + _rows("ddpm", lambda *a: 0.02) + _rows("gan", lambda *a: -0.01))
    tests, _ = paired_tests(strong_control)  # the control is best, but the primary names an augmented arm
    assert [(t["arm"], t["vs"]) for t in tests if t["primary"]] == [("ddpm", "real-only")]
    no_baseline = arm_roles(_rows("classical", lambda *a: 0.0) + _rows("ddpm", lambda *a: 0.0))
    assert no_baseline.baseline is None and no_baseline.comparisons() == [("ddpm", "classical")]


def test_a_declared_primary_is_adjusted_on_its_own_and_gates_every_other_test():
    # 3 folds x 2 queries, every difference positive: exact p = 1 / 32 for ddpm and gan alike
    kw = {"folds": (0, 1, 2), "classes": ("x",), "seeds": (0,)}
    base, gain = _rows("real-only", lambda *a: 0.0, **kw), (lambda c, f, s, q: 0.02 + 0.01 * f + 0.005 * q)
    mixed = (lambda c, f, s, q: (-1) ** (f + q) * 0.01 * (1 + f))  # signs alternate: no gain
    undeclared, _ = paired_tests(base + _rows("ddpm", gain, **kw) + _rows("gan", gain, **kw))
    assert all(t["p_holm"] == pytest.approx(1 / 16) and t["verdict"] != "gain" for t in undeclared)
    tests, _ = paired_tests(base + _rows("ddpm", gain, **kw) + _rows("gan", gain, **kw), primary="gan")
    primary, other = _test(tests, "gan"), _test(tests, "ddpm")
    assert (primary["family"], primary["primary"], other["family"], other["primary"]) == \
        ("primary", True, "secondary", False)
    assert primary["p_holm"] == pytest.approx(1 / 32) and primary["verdict"] == "gain"
    assert other["p_holm"] == pytest.approx(1 / 32) and other["verdict"] == "gain"  # the gate is open
    closed, _ = paired_tests(base + _rows("ddpm", gain, **kw) + _rows("gan", mixed, **kw), primary="gan")
    assert _test(closed, "gan")["verdict"] == "no significant difference"
    assert _test(closed, "ddpm")["p_wilcoxon"] == pytest.approx(1 / 32)
    gate = _test(closed, "gan")["p_holm"]
    assert gate > 0.05 and _test(closed, "ddpm")["p_holm"] == pytest.approx(gate)
    assert _test(closed, "ddpm")["verdict"] == "no significant difference"  # a strong secondary cannot pass a shut gate
    lines = verdict_lines(closed)
    assert lines[0].startswith("- EP1 m (primary, declared before the run): **gan**") and "(primary family)" in lines[0]
    assert "gated Holm-adjusted p" in lines[1]
    with pytest.raises(ValueError, match=r"the declared primary arm 'real-only' is not an augmented arm of EP1 m; "
                                         r"augmented arms: \['ddpm'\]"):
        paired_tests(base + _rows("ddpm", gain, **kw), primary="real-only")


def test_roles_come_from_the_rows_not_from_the_arm_names():
    """An arm named `baseline` with role baseline is the reference (n > 0), an arm named `classical` with
    role augmented is tested as an augmentation, and the real arm is never tested as one."""
    rows = (_rows("baseline", lambda *a: 0.0, role="baseline") + _rows("real-only", lambda *a: 0.01, role="control")
            + _rows("classical", _designed, role="augmented"))
    tests, _ = paired_tests(rows)
    assert {(t["arm"], t["vs"]) for t in tests} == {("real-only", "baseline"), ("classical", "baseline"),
                                                     ("classical", "real-only")}
    assert all(t["n"] > 0 for t in tests) and not any(t["arm"] == "baseline" for t in tests)
    assert [(t["arm"], t["vs"]) for t in tests if t["primary"]] == [("classical", "baseline")]


def test_a_diagnostic_arm_is_never_tested_so_never_primary_nor_in_a_verdict():
    rows = (_rows("real-only", lambda *a: 0.0) + _rows("ddpm", _designed)
            + _rows("oracle", lambda *a: 0.2, role="diagnostic"))
    tests, _ = paired_tests(rows)
    assert {(t["arm"], t["vs"]) for t in tests if t["class"] == ALL} == {("ddpm", "real-only")}
    assert [t["arm"] for t in tests if t["primary"]] == ["ddpm"]


def test_rows_with_two_roles_for_one_arm_or_two_baselines_are_refused():
    with pytest.raises(ValueError, match="arm 'x' has rows with roles 'baseline' and 'augmented'"):
        arm_roles(_rows("x", lambda *a: 0.0, role="baseline") + _rows("x", lambda *a: 0.0, role="augmented"))
    with pytest.raises(ValueError, match=r"2 baseline arms \['a', 'b'\]"):
        arm_roles(_rows("a", lambda *a: 0.0, role="baseline") + _rows("b", lambda *a: 0.0, role="baseline"))


def test_an_arm_whose_filter_kept_no_pairs_is_not_tested_as_augmented():
    base = _rows("real-only", lambda *a: 0.0, synthetic_pairs=None)
    partial = [dict(r, synthetic_pairs=0 if (r["class"], r["fold"], r["seed"]) == ("x", 0, 0) else 5)
               for r in _rows("ddpm", lambda *a: 0.02)]
    for r in partial:  # where the filter kept nothing, the arm scored far worse: that must not count
        r["dice"] -= 0.5 if r["synthetic_pairs"] == 0 else 0.0
    empty = _rows("gan", lambda *a: 0.3, synthetic_pairs=0)
    tests, notes = paired_tests(base + partial + empty + _rows("classical", lambda *a: 0.0, synthetic_pairs=4))
    assert notes == ["arm ddpm (m): filter kept 0 pairs in 1 of 8 (fold, seed, class) units; those cells are left "
                     "out of its tests", "arm gan (m): filter kept 0 pairs in 8 of 8 (fold, seed, class) units; "
                     "not tested"]
    assert not any(t["arm"] == "gan" for t in tests)
    x = _test(tests, "ddpm", "x")
    assert x["mean_diff"] == pytest.approx(0.02) and x["units"] == 4  # fold 0 keeps seed 1 only
    assert _test(tests, "ddpm", ALL, vs="classical")["mean_diff"] == pytest.approx(0.02)
    assert [t["arm"] for t in tests if t["primary"]] == ["ddpm"]


def test_summary_means_over_units_and_carries_post_processed_dice():
    rows = [{"protocol": "EP1", "model": "m", "arm": "a", "class": c, "fold": f, "seed": 0, "query": q, "dice": d,
             "dice_post": d + 0.1} for f, c, q, d in [(0, "x", "1", 0.2), (0, "x", "2", 0.4), (0, "y", "1", 0.6),
                                                     (1, "x", "3", 0.5), (1, "y", "3", 0.9)]]
    table = {(r["class"]): r for r in summarise(rows)}
    assert table["x"]["mean"] == pytest.approx((0.3 + 0.5) / 2) and table["x"]["std"] == pytest.approx(0.1)
    assert table["all"]["mean"] == pytest.approx(((0.3 + 0.6) / 2 + (0.5 + 0.9) / 2) / 2)
    assert table["all"]["mean_post"] == pytest.approx(table["all"]["mean"] + 0.1)
    assert "mean_post" not in summarise([{k: v for k, v in r.items() if k != "dice_post"} for r in rows])[0]


def test_a_target_is_met_only_by_a_claimed_gain_of_the_asked_size_and_a_miss_says_by_how_much():
    # 4 folds x 2 queries, every difference positive (Holm p = 2 x 1 / 128 in the primary family of two):
    # ddpm gains 2-5.5 points over real-only, 3.75 on average, and 2.75 over classical
    kw = {"folds": (0, 1, 2, 3), "classes": ("x",), "seeds": (0,)}
    gain = (lambda c, f, s, q: 0.02 + 0.01 * f + 0.005 * q)
    rows = (_rows("real-only", lambda *a: 0.0, **kw) + _rows("classical", lambda *a: 0.01, **kw)
            + _rows("ddpm", gain, **kw) + _rows("oracle", lambda *a: 0.03, role="diagnostic", **kw))
    tests, _ = paired_tests(rows, primary="ddpm")
    ceiling = gap_closed([s | {"role": "diagnostic" if s["arm"] == "oracle" else ROLE.get(s["arm"], "augmented")}
                          for s in summarise(rows)])
    checks = {c["vs"]: c for c in target_checks(tests, ceiling, over_baseline=3.5, over_control=3.0)}
    assert set(checks) == {"real-only", "classical"}  # the primary arm's comparisons only
    base, control = checks["real-only"], checks["classical"]
    assert base["gain"] == pytest.approx(3.75) and base["met"] and base["short_by"] is None
    assert control["verdict"] == "gain" and control["gain"] == pytest.approx(2.75) and not control["met"]
    assert control["short_by"] == pytest.approx(0.25)
    assert base["ceiling_gain"] == {"oracle": pytest.approx(3.0)} and control["ceiling_gain"] == {}
    assert target_checks(tests, ceiling, over_baseline=None, over_control=None) == []
    mixed = (lambda c, f, s, q: (-1) ** (f + q) * 0.05 + 0.015)  # +1.5 on average, half the units lost: no claim
    shaky, _ = paired_tests(_rows("real-only", lambda *a: 0.0, **kw) + _rows("gan", mixed, **kw), primary="gan")
    (check,) = target_checks(shaky, [], over_baseline=1.0, over_control=None)
    assert check["gain"] > 1.0 and check["verdict"] != "gain" and not check["met"] and check["short_by"] == 0.0
