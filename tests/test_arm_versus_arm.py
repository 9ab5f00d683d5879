"""benchmarks/arm_versus_arm.py: one run's arm against another run's, on runs that read the same models."""
import json

import numpy as np
import pytest

from files import benchmark_module


def _run(folder, dice: dict[str, list[float]], baseline="real-only", seed=0):
    """A results.json with one row per (arm, query volume, class); the two classes differ by a fixed offset."""
    rows = [{"protocol": "EP1", "model": "prototype", "arm": arm, "role": "baseline" if arm == baseline else "augmented",
             "class": cls, "fold": i % 2, "seed": seed, "query": str(i), "dice": value + offset}
            for arm, values in dice.items() for i, value in enumerate(values)
            for cls, offset in (("liver", -0.02), ("spleen", 0.02))]
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return folder


BASE = [0.70, 0.72, 0.80, 0.60, 0.65]


def test_the_arms_are_paired_per_unit_across_the_two_runs(tmp_path):
    bench = benchmark_module("arm_versus_arm")
    plain, styled = [0.71, 0.74, 0.80, 0.62, 0.66], [0.73, 0.75, 0.83, 0.61, 0.70]
    a = _run(tmp_path / "a", {"real-only": BASE, "styled": styled})
    b = _run(tmp_path / "b", {"real-only": BASE, "plain": plain})
    out = tmp_path / "versus"
    found = bench.main([str(a), "styled", str(b), "plain", "--out", str(out)])
    every = next(t for t in found["tests"] if t["class"] == "all")
    assert every["units"] == 5 and every["wins"] == 4 and every["losses"] == 1
    assert every["mean_diff"] == pytest.approx(100 * np.mean(np.subtract(styled, plain)))
    assert {t["class"] for t in found["tests"]} == {"liver", "spleen", "all"}
    assert found["baseline_cells"] == 10
    assert "| EP1 | prototype | all | 5 | +1.80 |" in out.with_suffix(".md").read_text()


@pytest.mark.parametrize("second, arm, seed, message", [
    ({"real-only": [b + 0.01 for b in BASE], "plain": BASE}, "plain", 0, "differ in 10 of 10 shared cells"),
    ({"real-only": BASE, "plain": BASE}, "missing", 0, r"has no arm 'missing'; its arms: \['real-only', 'plain'\]"),
    ({"real-only": BASE, "plain": BASE}, "plain", 1, "share no baseline cell"),
])
def test_runs_that_did_not_read_the_same_models_are_refused_and_nothing_written(tmp_path, second, arm, seed,
                                                                                 message):
    bench = benchmark_module("arm_versus_arm")
    a = _run(tmp_path / "a", {"real-only": BASE, "styled": BASE})
    b = _run(tmp_path / "b", second, seed=seed)
    out = tmp_path / "versus"
    with pytest.raises(SystemExit, match=message):
        bench.main([str(a), "styled", str(b), arm, "--out", str(out)])
    assert not out.with_suffix(".json").exists() and not out.with_suffix(".md").exists()
