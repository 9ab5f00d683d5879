"""Ablation statistics: spread over units and paired tests that never overclaim."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.stats import compare, paired_tests, summarise


def _rows(arm: str, shift: float, n_queries: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)  # the same base scores for every arm: a true paired design
    rows = []
    for fold in (0, 1):
        for q in range(n_queries):
            for cls in ("liver", "spleen"):
                base = float(rng.uniform(0.4, 0.8))
                rows.append({"protocol": "EP1", "model": "prototype", "arm": arm, "class": cls, "fold": fold,
                             "seed": 0, "query": str(q), "dice": base + shift})
    return rows


def test_summary_means_over_units():
    rows = [{"protocol": "EP1", "model": "m", "arm": "a", "class": c, "fold": f, "seed": 0, "query": q, "dice": d}
            for f, c, q, d in [(0, "x", "1", 0.2), (0, "x", "2", 0.4), (0, "y", "1", 0.6), (1, "x", "3", 0.5),
                               (1, "y", "3", 0.9)]]
    table = {(r["class"]): r for r in summarise(rows)}
    assert table["x"]["mean"] == pytest.approx((0.3 + 0.5) / 2) and table["x"]["std"] == pytest.approx(0.1)
    assert table["all"]["mean"] == pytest.approx(((0.3 + 0.6) / 2 + (0.5 + 0.9) / 2) / 2)


def test_consistent_gain_is_claimed_and_noise_is_not():
    rows = _rows("real-only", 0.0) + _rows("ddpm", 0.03)
    pooled = next(r for r in paired_tests(rows, baseline="real-only") if r["class"] == "all")
    assert pooled["verdict"] == "gain" and pooled["mean_diff"] == pytest.approx(0.03) and pooled["n"] == 32
    noisy = _rows("real-only", 0.0)
    rng = np.random.default_rng(1)
    jitter = [dict(r, arm="gan", dice=r["dice"] + float(rng.normal(0, 0.05))) for r in noisy]
    pooled = next(r for r in paired_tests(noisy + jitter, baseline="real-only") if r["class"] == "all")
    assert pooled["verdict"] == "no significant difference"


def test_compare_handles_ties_and_tiny_samples():
    assert compare([0.5, 0.6], [0.5, 0.6], alpha=0.05)["verdict"] == "no difference"
    assert compare([0.5], [0.4], alpha=0.05)["verdict"] == "too few pairs"
    assert compare([0.1, 0.2, 0.3], [0.5, 0.6, 0.7], alpha=0.05)["verdict"] == "no significant difference"  # n=3
