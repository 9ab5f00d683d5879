"""The ablation report: the unit and Holm-adjusted p in its tables, strict JSON, and `supportforge report`."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.report import DiceScoring, build_report


ROLE = {"real-only": "baseline", "classical": "control"}  # the role of the test arms named so; others: augmented
ROOT = Path(__file__).resolve().parents[1]
SHIPPED_DOCS = [ROOT / "README.md", *sorted((ROOT / "benchmarks" / "results").rglob("*.md"))]


def _rows(arm: str, shift: float, *, folds=(0, 1, 2), post: bool = False) -> list[dict]:
    rows = []
    for f in folds:
        for qi, q in enumerate(("5", "6")):
            for ci, c in enumerate(("liver", "spleen")):
                dice = 0.4 + 0.05 * f + 0.03 * qi + 0.1 * ci + shift * (1 + 0.1 * qi + 0.2 * f)
                rows.append({"protocol": "EP1", "model": "prototype", "arm": arm, "role": ROLE.get(arm, "augmented"),
                             "class": c, "fold": f, "seed": 0,
                             "query": q, "dice": dice, **({"dice_post": dice + 0.01} if post else {})})
    return rows


def _no_nan(name: str):
    raise AssertionError(f"results.json holds {name}")


def _build(out: Path, rows: list[dict], *, quality=(), scoring=DiceScoring("working", True)) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    build_report(out, title="t", rows=rows, arms=["real-only", "classical", "ddpm"], context={"experiment": "t"},
                 quality=list(quality), scoring=scoring, figures={}, filter_dice=0.5)
    return json.loads((out / "results.json").read_text(), parse_constant=_no_nan)


@pytest.fixture()
def results_file(tmp_path) -> Path:
    _build(tmp_path / "run", _rows("real-only", 0.0) + _rows("classical", 0.01) + _rows("ddpm", 0.03))
    return tmp_path / "run" / "results.json"


def test_quality_table_names_each_source_s_settings_from_the_config(tmp_path):
    quality = [{"source": s, "class": "liver", "mask_consistency": 0.8, "histogram_distance": 0.1,
                "nn_distance_to_supports": 0.2, "per_pair": [0.8]} for s in ("propagated", "classical")]
    generators = {"propagated": {"appearance": True}, "ddpm": {"steps": 500}}
    build_report(tmp_path, title="t", rows=_rows("real-only", 0.0) + _rows("propagated", 0.02), arms=[],
                 context={"experiment": "t", "config": {"generators": generators}}, quality=quality,
                 scoring=DiceScoring("working", True), figures={}, filter_dice=0.5)
    report = (tmp_path / "report.md").read_text()
    assert "Source settings (the run's `[generators.*]`): propagated: appearance = true." in report  # no ddpm: unused
    _build(tmp_path / "plain", _rows("real-only", 0.0), quality=quality)
    assert "Source settings" not in (tmp_path / "plain" / "report.md").read_text()


def test_tests_table_names_the_unit_and_the_primary_comparison(results_file):
    report = (results_file.parent / "report.md").read_text()
    assert "### EP1: paired differences (unit: query volume of a fold, n = distinct (fold, query))" in report
    assert ("| model | arm | vs | class | n | dropped zeros | mean diff | 95 % CI | wins/losses | p (Wilcoxon) | "
            "p (Holm) | p (t) | verdict |") in report
    best = "(best arm, picked after the run)"  # no [protocol] primary: the mark must not read as a declared one
    assert report.count(best) == 2 and f"| prototype | **ddpm** {best} | real-only | all | 6 | 0 |" in report
    assert f"EP1 prototype {best}: **ddpm**" in report and "Holm-adjusted p" in report
    assert "(primary" not in report and "not a pre-declared comparison" in report
    assert "Dice is scored on the working label grid, with post-processing (headline)." in report
    assert "post-processed" not in report.split("## EP1: mean Dice")[1].splitlines()[2]  # no second column
    results = json.loads(results_file.read_text())
    assert (results["dice_grid"], results["postprocess"]) == ("working", True)
    primary = [t for t in results["tests"] if t["primary"]]
    assert [(t["arm"], t["vs"], t["class"], t["n"]) for t in primary] == [("ddpm", "real-only", "all", 6)]


def test_results_json_is_strict_json_with_null_for_undefined_values(tmp_path):
    rows = _rows("real-only", 0.0, folds=(0,)) + _rows("ddpm", 0.02, folds=(0,))
    rows = [r for r in rows if r["query"] == "5"]  # one unit: no CI, no t-test
    quality = [{"source": "ddpm", "class": "liver", "mask_consistency": float("nan"), "histogram_distance": 0.1,
                "nn_distance_to_supports": float("inf"), "per_pair": [0.4]}]
    results = _build(tmp_path, rows, quality=quality)  # parse_constant raises on NaN / Infinity
    pooled = next(t for t in results["tests"] if t["class"] == "all")
    assert pooled["units"] == 1 and pooled["ci_low"] is None and pooled["p_ttest"] is None
    assert results["quality"][0]["mask_consistency"] is None and results["quality"][0]["nn_distance_to_supports"] is None
    assert "| n/a | 1/0 | 1 | 1 | n/a | too few units |" in (tmp_path / "report.md").read_text()


def test_post_processed_dice_is_a_second_column(tmp_path):
    rows = _rows("real-only", 0.0, post=True) + _rows("ddpm", 0.03, post=True)
    results = _build(tmp_path, rows, scoring=DiceScoring("native", False))
    report = (tmp_path / "report.md").read_text()
    assert "| model | arm | liver | spleen | all | all, post-processed |" in report
    assert "Dice is scored on the native label grid, without post-processing (headline). A second column" in report
    assert (results["dice_grid"], results["postprocess"]) == ("native", False)
    cell = next(s for s in results["summary"] if s["arm"] == "ddpm" and s["class"] == "all")
    assert cell["mean_post"] == pytest.approx(cell["mean"] + 0.01)


def test_report_command_rebuilds_the_report(results_file, tmp_path, capsys):
    out = tmp_path / "rebuilt"
    assert main(["report", str(results_file), "--out", str(out)]) == 0
    assert f"wrote {out / 'report.md'}" in capsys.readouterr().out
    for name in ("report.md", "results.json", "dice_EP1.png"):
        assert (out / name).is_file(), name
    old, new = json.loads(results_file.read_text()), json.loads((out / "results.json").read_text())
    assert new["tests"] == old["tests"] and new["rows"] == old["rows"]
    assert (out / "report.md").read_text() == (results_file.parent / "report.md").read_text()


def test_a_rebuilt_validation_report_still_says_it_scored_the_training_volumes(results_file, tmp_path):
    results = json.loads(results_file.read_text())
    assert results["score_on"] == "queries"
    results_file.write_text(json.dumps(results | {"score_on": "training"}))
    out = tmp_path / "rebuilt"
    assert main(["report", str(results_file), "--out", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["score_on"] == "training"
    assert "**Validation run:** the folds' training volumes are scored" in (out / "report.md").read_text()


def test_a_rebuilt_report_keeps_the_primary_arm_its_config_declared(results_file, tmp_path):
    results = json.loads(results_file.read_text())
    results["context"]["config"] = {"protocol": {"primary": "ddpm"}}
    results_file.write_text(json.dumps(results))
    out = tmp_path / "rebuilt"
    assert main(["report", str(results_file), "--out", str(out)]) == 0
    tests = json.loads((out / "results.json").read_text())["tests"]
    assert {(t["arm"], t["vs"]) for t in tests if t["family"] == "primary"} == {("ddpm", "real-only"),
                                                                                ("ddpm", "classical")}
    report = (out / "report.md").read_text()
    assert "The primary arm, ddpm, was declared in the config before the run" in report
    assert "| prototype | **ddpm** (primary, declared before the run) | real-only | all |" in report
    assert "EP1 prototype (primary, declared before the run): **ddpm**" in report and "picked after" not in report


def test_the_report_says_whether_the_primary_arm_reached_its_targets_and_by_how_much_it_missed(tmp_path):
    rows = (_rows("real-only", 0.0) + _rows("classical", 0.01) + _rows("ddpm", 0.03)
            + [r | {"arm": "oracle", "role": "diagnostic"} for r in _rows("oracle", 0.02)])
    out = tmp_path / "run"
    out.mkdir()
    build_report(out, title="t", rows=rows, arms=["real-only", "classical", "ddpm", "oracle"],
                 context={"experiment": "t", "config": {"protocol": {"target_over_baseline": 5.0,
                                                                     "target_over_control": 2.0}}},
                 quality=[], scoring=DiceScoring("native", False), figures={}, filter_dice=0.5,
                 target_over_baseline=5.0, target_over_control=2.0)
    results = json.loads((out / "results.json").read_text())
    checks = {t["vs"]: t for t in results["targets"]}
    # ddpm gains 3.75 over real-only and 2.5 over classical on 6 units, too few for a claim; the oracle 2.5
    assert checks["real-only"]["gain"] == pytest.approx(3.75) and checks["classical"]["gain"] == pytest.approx(2.5)
    assert checks["real-only"]["short_by"] == pytest.approx(1.25) and checks["classical"]["short_by"] == 0.0
    assert not checks["real-only"]["met"] and not checks["classical"]["met"]
    report = (out / "report.md").read_text()
    section = report[report.index("## Targets"):report.index("## Ceiling")]
    assert "| EP1 | prototype | ddpm | real-only | +5.0 | +3.8 [" in section and "| no: 1.2 short |" in section
    assert "| EP1 | prototype | ddpm | classical | +2.0 | +2.5 [" in section
    assert "| no: the size holds, the gain is not claimed (no significant difference) |" in section
    assert "the ceiling arm oracle gains +2.5 over real-only; the +5.0 asked lies above it" in section
    rebuilt = tmp_path / "rebuilt"  # the targets come back from the config the results file recorded
    assert main(["report", str(out / "results.json"), "--out", str(rebuilt)]) == 0
    assert json.loads((rebuilt / "results.json").read_text())["targets"] == results["targets"]
    untargeted = tmp_path / "none"
    _build(untargeted, rows)
    assert "## Targets" not in (untargeted / "report.md").read_text()


def _drop(key: str):
    def edit(results: dict) -> None:
        del results[key]
    return edit


def _drop_row_field(i: int, key: str):
    def edit(results: dict) -> None:
        del results["rows"][i][key]
    return edit


def _set_dice(value):
    def edit(results: dict) -> None:
        results["rows"][2]["dice"] = value
    return edit


BAD = {  # case -> (edit of the parsed file or of its text, what the one-line error must say)
    "old format: no dice_grid": (_drop("dice_grid"), "no field 'dice_grid' (an older results format?)"),
    "old format: no postprocess": (_drop("postprocess"), "postprocess = None; expected true or false"),
    "row without dice": (_drop_row_field(3, "dice"), "row 3 has no field 'dice' (an older results format?)"),
    "row without query": (_drop_row_field(0, "query"), "row 0 has no field 'query'"),
    "old format: row without role": (_drop_row_field(1, "role"), "row 1 has no field 'role' (an older results format?)"),
    "unknown role": (lambda r: r["rows"][4].update(role="reference"),
                     "row 4 has role = 'reference'; expected one of ['baseline', 'control', 'augmented', 'diagnostic']"),
    "dice out of range": (_set_dice(1.5), "row 2 has dice = 1.5; expected a number in [0, 1]"),
    "NaN in the file": (lambda text: text.replace('"dice": ', '"dice": NaN, "x": ', 1), "NaN is not valid JSON"),
    "truncated file": (lambda text: text[: len(text) // 2], "not a valid results JSON"),
    "bad dice_grid": (lambda r: r.update(dice_grid="256"), "dice_grid = '256'; expected one of ['native', 'working']"),
    "bad score_on": (lambda r: r.update(score_on="test"), "score_on = 'test'; expected one of ['queries', 'training']"),
    "primary not augmented": (lambda r: r["context"].update(config={"protocol": {"primary": "classical"}}),
                              "the config's [protocol] primary = 'classical' is not an augmented arm of its rows; "
                              "augmented arms: ['ddpm']"),
    "target as text": (lambda r: r["context"].update(config={"protocol": {"target_over_baseline": "3"}}),
                       "the config's [protocol] target_over_baseline = '3' is not a gain in Dice points in [0, 100]"),
    "negative target": (lambda r: r["context"].update(config={"protocol": {"target_over_control": -2}}),
                        "the config's [protocol] target_over_control = -2 is not a gain in Dice points in [0, 100]"),
}


def _tree(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("case", list(BAD))
def test_report_command_refuses_bad_results_and_writes_nothing(results_file, tmp_path, capsys, case):
    edit, message = BAD[case]
    if case in ("NaN in the file", "truncated file"):
        results_file.write_text(edit(results_file.read_text()))
    else:
        results = json.loads(results_file.read_text())
        edit(results)
        results_file.write_text(json.dumps(results))
    before, out = _tree(tmp_path), tmp_path / "rebuilt"
    assert main(["report", str(results_file), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"supportforge: error: {results_file}: ") and message in err[0], err
    assert not out.exists() and _tree(tmp_path) == before


def test_report_command_on_a_missing_file(tmp_path, capsys):
    assert main(["report", str(tmp_path / "none.json"), "--out", str(tmp_path / "o")]) == 2
    assert "none.json: cannot read the results file (No such file or directory)" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_run_with_only_a_baseline_and_a_ceiling_says_that_nothing_was_tested(tmp_path):
    rows = _rows("real-only", 0.0) + [r | {"arm": "oracle", "role": "diagnostic"} for r in _rows("oracle", 0.05)]
    results = _build(tmp_path, rows)
    report = (tmp_path / "report.md").read_text()
    verdict = report.split("## Verdict")[1].split("## EP1")[0]
    assert results["tests"] == [] and "nothing was tested and there is no verdict" in verdict
    assert "p-values are Holm-adjusted" not in report  # no paragraph about a family of 0 tests
    assert "| prototype | oracle |" in report  # the ceiling is still in the mean Dice table


@pytest.mark.parametrize("doc", SHIPPED_DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_a_shipped_document_links_only_files_it_ships(doc):
    """A copied run folder keeps the figures its report links (`supportforge report` rebuilds one that lost some)."""
    links = [link.split("#")[0] for link in re.findall(r"\]\(([^)\s]+)\)", doc.read_text())]
    assert [link for link in links if link and "://" not in link and not (doc.parent / link).exists()] == []


def test_a_run_records_the_cpu_model_and_its_widest_vector_set_that_decide_torch_s_kernels(tmp_path):
    from pipelines.stages.report import cpu_kind, provenance
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Xeon X\nflags\t\t: fpu sse4_2 avx avx2\n\n"
                    "processor\t: 1\nmodel name\t: Xeon X\nflags\t\t: fpu sse4_2 avx avx2\n")
    assert cpu_kind(info) == {"cpu_model": "Xeon X", "simd": "avx2"}
    assert cpu_kind(tmp_path / "missing") == {"cpu_model": None, "simd": None}
    assert {"cpu_model", "simd"} <= set(provenance(cpu=True))  # stages.json and the report's context carry them


def test_a_run_records_the_version_of_every_package_that_computes_a_stage():
    from pipelines.stages.report import COMPUTING, package_versions
    found = package_versions()
    assert set(found) == set(COMPUTING) and found["albumentations"] and found["scikit-image"]
    assert package_versions(("no-such-package-x",)) == {"no-such-package-x": None}


def test_the_installed_computing_packages_are_the_pinned_ones():
    """`make install` applies constraints.txt; a different version may compute other numbers than the results."""
    from pipelines.stages.report import COMPUTING, package_versions
    pins = dict(line.split("==") for line in (ROOT / "constraints.txt").read_text().splitlines()
                if line and not line.startswith("#"))
    assert set(pins) == set(COMPUTING) - {"torch"}
    assert {name: package_versions((name,))[name] for name in pins} == pins
