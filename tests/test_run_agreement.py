"""benchmarks/run_agreement.py: two runs' units paired, per arm and per gain; bad pairs of runs refused."""
import json

import numpy as np
import pytest

from files import benchmark_module


def _run(folder, dice: dict[str, list[float]], baseline="real-only", seeds=(0,)):
    """A results.json with one row per (arm, query volume, class, seed); the classes differ by a fixed offset so
    that the unit mean of seed s is the given value + 0.1 s."""
    rows = []
    for arm, values in dice.items():
        for i, value in enumerate(values):
            for seed in seeds:
                for cls, offset in (("liver", -0.02), ("spleen", 0.02)):
                    rows.append({"protocol": "EP1", "model": "conditional", "arm": arm,
                                 "role": "baseline" if arm == baseline else "augmented", "class": cls,
                                 "fold": i % 2, "seed": seed, "query": str(i), "dice": value + offset + 0.1 * seed})
    folder.mkdir()
    (folder / "results.json").write_text(json.dumps({"rows": rows}))
    return folder


def test_units_are_paired_across_runs_and_gains_compared(tmp_path):
    bench = benchmark_module("run_agreement")
    base_a, base_b = [0.70, 0.72, 0.80, 0.60], [0.72, 0.71, 0.83, 0.62]
    arm_a, arm_b = [0.73, 0.74, 0.81, 0.65], [0.73, 0.73, 0.84, 0.63]
    a = _run(tmp_path / "a", {"real-only": base_a, "aug": arm_a, "only-in-a": base_a})
    b = _run(tmp_path / "b", {"real-only": base_b, "aug": arm_b})
    out = tmp_path / "agree"
    found = bench.main([str(a), str(b), "--out", str(out)])

    assert [r["arm"] for r in found["arms"]] == ["real-only", "aug"]  # an arm one run lacks is left out
    assert found["units"] == 4
    base = found["arms"][0]
    assert base["first"] == pytest.approx(100 * np.mean(base_a))
    assert base["correlation"] == pytest.approx(np.corrcoef(base_a, base_b)[0, 1])
    assert base["mean_abs_diff"] == pytest.approx(100 * np.mean(np.abs(np.subtract(base_a, base_b))))
    gain_a, gain_b = np.subtract(arm_a, base_a), np.subtract(arm_b, base_b)
    (gain,) = found["gains"]
    assert gain["first"] == pytest.approx(100 * gain_a.mean()) and gain["second"] == pytest.approx(100 * gain_b.mean())
    assert gain["correlation"] == pytest.approx(np.corrcoef(gain_a, gain_b)[0, 1])
    assert json.loads(out.with_suffix(".json").read_text())["gains"][0]["arm"] == "aug"
    assert "| aug | +2.75 | +1.25 |" in out.with_suffix(".md").read_text()


def test_only_the_seeds_both_runs_scored_are_compared(tmp_path):
    bench = benchmark_module("run_agreement")
    a = _run(tmp_path / "a", {"real-only": [0.7, 0.8, 0.6], "aug": [0.75, 0.8, 0.7]}, seeds=(0, 1))
    b = _run(tmp_path / "b", {"real-only": [0.7, 0.8, 0.6], "aug": [0.75, 0.8, 0.7]}, seeds=(1,))
    found = bench.compare(a, b)
    assert found["seeds"] == [1]
    assert found["arms"][1]["mean_abs_diff"] == pytest.approx(0.0)


@pytest.mark.parametrize("second, message", [
    ({"other-baseline": [0.7, 0.8], "aug": [0.7, 0.9]}, "need the same baseline arm: 'real-only' against"),
    ({"real-only": [], "aug": []}, "share no scored cell"),
])
def test_runs_that_cannot_be_paired_are_refused_and_nothing_written(tmp_path, second, message):
    bench = benchmark_module("run_agreement")
    a = _run(tmp_path / "a", {"real-only": [0.7, 0.8], "aug": [0.7, 0.9]})
    b = _run(tmp_path / "b", second, baseline=next(iter(second)))
    out = tmp_path / "agree"
    with pytest.raises(SystemExit, match=message):
        bench.main([str(a), str(b), "--out", str(out)])
    assert not out.with_suffix(".json").exists() and not out.with_suffix(".md").exists()
