"""The registered source in the pipeline: other subjects' slices relabelled by the baseline arm's own model,
which is the very fine-tune that arm scores, and the config's refusal without the model it samples."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from augment.synthesis import load_set
from files import benchmark_module, snapshot
from pipelines.cli import main
from pipelines.config import ConfigError, load
from segment import train as seg_train
from segment.data.protocol import make_folds
from segment.predict import make_predictor
from pipelines.stages.inputs import support_pairs
from test_pipeline_pairs import PAIRS

# real-only and registered; {learned} is the [generators.learned] section (the model registered samples)
REGISTERED = (PAIRS.split("[generators.learned]")[0] + "{learned}\n" + PAIRS[PAIRS.index("[synthesis]"):].split(
    "[[arms]]")[0] + '[[arms]]\nname = "real-only"\nrole = "baseline"\n[[arms]]\nname = "registered"\n'
    'sources = ["registered"]\n[generators.registered]\nmin_similarity = 0.0\nmin_agreement = 0.01\n'
    + PAIRS[PAIRS.index("[run]"):])
LEARNED = "\n".join(PAIRS[PAIRS.index("[generators.learned]"):PAIRS.index("{learned}")].splitlines())


def _config(tmp: Path, data: Path, learned: str) -> Path:
    path = tmp / "r.toml"
    path.write_text(REGISTERED.format(data=data, out=tmp / "r", cache=tmp / "cache", diagnostic="false",
                                      learned=learned))
    return path


def test_registered_pairs_take_the_baseline_arm_s_masks_and_share_its_fine_tune(phantom_copy, phantom_data, tmp_path):
    assert main(["run", str(_config(tmp_path, phantom_copy, LEARNED))]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    stages = json.loads((tmp_path / "r" / "stages.json").read_text())
    relabelled = [r for r in stages["records"] if r["stage"] == "relabel"]
    tunes = {r["label"].split()[1]: r["key"] for r in stages["records"] if r["stage"] == "finetune"}
    assert len(relabelled) == 1 and set(tunes) == {"real-only", "registered"}
    assert stages["summary"]["finetune"] == {"ran": 2, "cached": 0}   # the teacher IS the real-only arm's fine-tune
    cache = tmp_path / "cache" / "stages"
    syn = load_set(cache / "relabel" / relabelled[0]["key"] / "set")
    assert syn.manifest["relabelled"]["teacher"] == tunes["real-only"]
    assert {r["arm"]: r["synthetic_pairs"] for r in results["rows"]} == {"real-only": None, "registered": len(syn)}
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    assert len(syn) and all(p["volume"] in fold.train for p in syn.manifest["pairs"])  # other subjects, no query
    real_i, real_m, _ = support_pairs(phantom_data, fold, "liver")
    teacher = make_predictor(seg_train.load(cache / "finetune" / tunes["real-only"] / "model.pt"))
    assert torch.equal(syn.masks, (teacher(real_i, real_m, syn.images) > 0.5).float())
    assert [p.name for p in (cache / "source-train").iterdir()]  # the learned source's model, trained once


def test_registered_without_the_learned_section_stops_at_config_time(phantom_copy, tmp_path, capsys):
    cfg = _config(tmp_path, phantom_copy, "")
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"arm 'registered' uses 'registered', which samples the 'learned' model, "
                                          r"but there is no \[generators.learned\] section; add one"):
        load(cfg)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("supportforge: error: ")
    assert snapshot(tmp_path) == before


def test_the_registered_benchmark_measures_every_candidate_and_chooses_by_the_pairs_it_keeps(phantom_copy, tmp_path):
    bench = benchmark_module("augment_registered")
    result = bench.main(["--config", str(_config(tmp_path, phantom_copy, LEARNED)), "--out", str(tmp_path / "out")])
    sets = [load_set(p.parent) for p in (tmp_path / "cache" / "stages").glob("synthesis/*/set/manifest.json")]
    assert result["all"]["candidates"] == sum(len(s) for s in sets) > 0
    agreeing = [s["agreeing"] for s in result["all"]["thresholds"].values()]
    assert agreeing == sorted(agreeing, reverse=True)                 # a stricter threshold keeps fewer pairs
    assert [s["kept"] for s in result["all"]["thresholds"].values()] == \
        [min(a, result["n_pairs"]) for a in agreeing]                  # one fold and class: its n best agreeing
    enough = [float(t) for t, s in result["all"]["thresholds"].items() if s["per_unit"] >= result["n_pairs"]]
    assert result["chosen_min_agreement"] == (max(enough) if enough else None)
    report = (tmp_path / "out" / "augment_registered.md").read_text()
    assert report.startswith("# Registered pairs: label accuracy")
    assert result["figures"] == ["augment_registered_liver.png"] and "![augment_registered_liver.png]" in report
    assert (tmp_path / "out" / "augment_registered_liver.png").read_bytes()[:4] == b"\x89PNG"
    assert not list((tmp_path / "cache" / "stages").glob("evaluate/*"))  # it reads no Dice of any scored volume


def test_a_class_with_no_agreeing_pair_fine_tunes_on_the_real_supports_alone(phantom_copy, tmp_path):
    cfg = _config(tmp_path, phantom_copy, LEARNED)
    cfg.write_text(cfg.read_text().replace("min_agreement = 0.01", "min_agreement = 1.0"))  # no mask agrees fully
    assert main(["run", str(cfg)]) == 0
    results = json.loads((tmp_path / "r" / "results.json").read_text())
    stages = json.loads((tmp_path / "r" / "stages.json").read_text())
    assert {r["arm"]: r["synthetic_pairs"] for r in results["rows"]} == {"real-only": None, "registered": 0}
    assert not [r for r in stages["records"] if r["stage"] == "quality"]  # no quality row for an empty set
    tunes = [r["key"] for r in stages["records"] if r["stage"] == "finetune"]
    assert len(set(tunes)) == 2          # an empty pool is still its own arm's fine-tune, keyed by its set


def test_the_overlap_benchmark_splits_a_validation_run_by_the_volumes_that_gave_registered_pairs(phantom_copy,
                                                                                                 tmp_path, capsys):
    cfg = tmp_path / "v.toml"
    cfg.write_text(REGISTERED.format(data=phantom_copy, out=tmp_path / "v", cache=tmp_path / "cache",
                                     diagnostic='false\nscore_on = "training"', learned=LEARNED))
    assert main(["run", str(cfg)]) == 0
    bench, run = benchmark_module("validation_overlap"), tmp_path / "v"
    [found] = bench.main([str(run), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "o")])
    results = json.loads((run / "results.json").read_text())
    relabel = next(r for r in json.loads((run / "stages.json").read_text())["records"] if r["stage"] == "relabel")
    registered = load_set(tmp_path / "cache" / "stages" / "relabel" / relabel["key"] / "set")
    gave = {p["volume"] for p in registered.manifest["pairs"]}  # one fold, seed and class
    dice = {(r["arm"], r["query"]): r["dice"] for r in results["rows"]}
    volumes = {r["query"] for r in results["rows"]}
    expected = {part: [100 * (dice["registered", v] - dice["real-only", v]) for v in volumes
                       if (v in gave) == (part == "gave pairs")] for part in ("gave none", "gave pairs")}
    assert {r["part"]: (r["cells"], r["mean_diff"]) for r in found["rows"]} == \
        {p: (len(d), pytest.approx(sum(d) / len(d))) for p, d in expected.items() if d}
    assert (tmp_path / "o.md").read_text().startswith("# How much a validation run favours the registered source")
    queries = tmp_path / "q"
    queries.mkdir()
    (queries / "results.json").write_text(json.dumps(results | {"score_on": "queries"}))
    with pytest.raises(SystemExit, match="not a validation run"):
        bench.main([str(queries), "--cache", str(tmp_path / "cache"), "--out", str(tmp_path / "none")])
    assert not list(tmp_path.glob("none*"))


ROUND_2 = '[[arms]]\nname = "round 2"\nsources = ["registered"]\nteacher = "{teacher}"\n'


def _rounds(tmp: Path, data: Path, teacher: str) -> Path:
    """real-only, registered (taught by real-only) and round 2 (taught by the arm `teacher` names)."""
    path = _config(tmp, data, LEARNED)
    text = path.read_text()
    path.write_text(text.replace("[run]", ROUND_2.format(teacher=teacher) + "[run]", 1))
    return path


def test_a_round_of_self_training_relabels_the_candidates_with_the_named_arm_s_own_fine_tune(phantom_copy,
                                                                                              phantom_data, tmp_path):
    assert main(["run", str(_rounds(tmp_path, phantom_copy, "registered"))]) == 0
    stages = json.loads((tmp_path / "r" / "stages.json").read_text())
    tunes = {r["label"].split(" fold")[0].split(" ", 1)[1]: r["key"] for r in stages["records"]
             if r["stage"] == "finetune"}
    assert stages["summary"]["finetune"] == {"ran": 3, "cached": 0}   # each arm's model made once, teachers included
    cache = tmp_path / "cache" / "stages"
    sets = [load_set(cache / "relabel" / r["key"] / "set") for r in stages["records"] if r["stage"] == "relabel"]
    assert [s.manifest["relabelled"]["teacher"] for s in sets] == [tunes["real-only"], tunes["registered"]]
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    real_i, real_m, _ = support_pairs(phantom_data, fold, "liver")
    round_1 = make_predictor(seg_train.load(cache / "finetune" / tunes["registered"] / "model.pt"))
    assert torch.equal(sets[1].masks, (round_1(real_i, real_m, sets[1].images) > 0.5).float())
    pool = json.loads((cache / "finetune" / tunes["round 2"] / "pool.json").read_text())
    assert pool["synthetic"] == len(sets[1])          # round 2 is fine-tuned on the pairs round 1 relabelled
    assert [r["label"] for r in stages["records"] if r["stage"] == "relabel"] == [
        "registered, taught by real-only fold0 s0 liver", "registered, taught by registered fold0 s0 liver"]
    report = (tmp_path / "r" / "report.md").read_text()   # each round's set is judged and drawn, named by teacher
    assert "| registered | liver |" in report and "| registered, taught by registered | liver |" in report


def test_a_teacher_loop_stops_the_run_at_config_time_and_writes_nothing(phantom_copy, tmp_path, capsys):
    cfg = _rounds(tmp_path, phantom_copy, "round 2")
    before = snapshot(tmp_path)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["supportforge: error: [arms.round 2] teacher = 'round 2': the teachers form a loop round 2 -> "
                   "round 2; a model cannot relabel the pairs it is fine-tuned on"]
    assert snapshot(tmp_path) == before


def test_the_registered_benchmark_measures_a_named_teacher_and_refuses_an_unknown_one(phantom_copy, tmp_path):
    bench = benchmark_module("augment_registered")
    cfg = _rounds(tmp_path, phantom_copy, "registered")
    result = bench.main(["--config", str(cfg), "--out", str(tmp_path / "out"), "--teacher", "registered"])
    assert result["teacher"] == "registered" and result["all"]["candidates"] > 0
    assert "Teacher: the prototype model of registered" in (tmp_path / "out" / "augment_registered.md").read_text()
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"teacher = 'nobody' is not an arm of this config"):
        bench.main(["--config", str(cfg), "--out", str(tmp_path / "none"), "--teacher", "nobody"])
    assert snapshot(tmp_path) == before


def test_the_overlap_benchmark_counts_a_volume_that_gave_any_round_s_set_a_pair(tmp_path):
    run, cache = tmp_path / "run", tmp_path / "cache"
    run.mkdir()
    records = []
    for key, volumes in (("round1", ["3", "5"]), ("round2", ["5", "7"])):  # two teachers keep different pairs
        (cache / "stages" / "relabel" / key / "set").mkdir(parents=True)
        manifest = {"pairs": [{"volume": v, "slice": 0} for v in volumes]}
        (cache / "stages" / "relabel" / key / "set" / "manifest.json").write_text(json.dumps(manifest))
        records.append({"stage": "relabel", "label": "registered fold2 s1 liver", "key": key})
    (run / "stages.json").write_text(json.dumps({"records": records}))
    found = benchmark_module("validation_overlap").registered_volumes(run, cache)
    assert found == {(2, 1, "liver"): {"3", "5", "7"}}
