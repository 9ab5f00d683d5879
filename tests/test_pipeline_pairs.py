"""Learned-transform and oracle sources in the pipeline: a tiny phantom ablation end to end, the oracle's
gate, the share of the oracle gap, and bad pairs surfacing as one line with nothing written."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from augment.config import LearnedConfig
from augment.manifest import LeakageError
from augment.registry import volume_source
from pipelines.cache import StageCache
from pipelines.cli import main
from pipelines.config import ConfigError, load
from pipelines.stages.base import StageEntry, StageRunner
from pipelines.stages.synthesis import Synthesis
from segment.data.protocol import make_folds
from segment.data.volumes import DataError
from files import snapshot

PAIRS = """
name = "pairs"
models = ["prototype"]
[data]
path = "{data}"
resolution = 32
[protocol]
folds = [0]
classes = ["liver"]
seeds = [0]
diagnostic = {diagnostic}
[segment]
width = 8
embed_dim = 16
steps = 6
batch = 2
[generators.learned]
channels = [8, 16, 16, 8]
final_channels = [8]
integration_steps = 3
steps = 3
batch_size = 2
pool_size = 6
candidates = 2
{learned}
[synthesis]
n_pairs = 3
finetune_steps = 3
synthetic_share = 0.5
[[arms]]
name = "real-only"
role = "baseline"
[[arms]]
name = "learned"
sources = ["learned"]
role = "augmented"
[[arms]]
name = "oracle"
sources = ["oracle"]
role = "{oracle_role}"
[run]
out = "{out}"
cache = "{cache}"
"""

# the same run with two arms: real-only and the propagated source (which needs no section)
REAL_AND_PROPAGATED = (PAIRS.split("[[arms]]")[0] + '[[arms]]\nname = "real-only"\nrole = "baseline"\n[[arms]]\n'
                       'name = "propagated"\nsources = ["propagated"]\n' + PAIRS[PAIRS.index("[run]"):])

def _config(tmp: Path, data: Path, *, name: str, diagnostic: str = "true", oracle_role: str = "diagnostic",
            learned: str = "") -> Path:
    path = tmp / f"{name}.toml"
    path.write_text(PAIRS.format(data=data, out=tmp / name, cache=tmp / "cache", diagnostic=diagnostic,
                                 oracle_role=oracle_role, learned=learned))
    return path


@pytest.fixture(scope="module")
def pairs_run(phantom_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pairs")
    assert main(["run", str(_config(tmp, phantom_dir, name="a"))]) == 0
    return tmp / "a", tmp / "cache"


def test_learned_and_oracle_arms_run_end_to_end_with_the_share_of_the_gap(pairs_run):
    out, _ = pairs_run
    results = json.loads((out / "results.json").read_text())
    assert {r["arm"]: r["role"] for r in results["rows"]} == {"real-only": "baseline", "learned": "augmented",
                                                              "oracle": "diagnostic"}
    assert {r["arm"]: r["synthetic_pairs"] for r in results["rows"]} == {"real-only": None, "learned": 3, "oracle": 3}
    [gap] = results["ceiling"]
    mean = {s["arm"]: s["mean"] for s in results["summary"] if s["class"] == "all"}
    assert (gap["arm"], gap["baseline"], gap["ceiling"]) == ("learned", "real-only", "oracle")
    expected = (mean["learned"] - mean["real-only"]) / (mean["oracle"] - mean["real-only"]) \
        if mean["oracle"] > mean["real-only"] else None
    assert gap["share_of_gap_closed"] == (pytest.approx(expected) if expected is not None else None)
    report = (out / "report.md").read_text()
    assert "## Ceiling: diagnostic arms" in report and "| EP1 | prototype | learned |" in report


def test_the_oracle_is_never_tested_primary_or_in_a_verdict(pairs_run):
    out, _ = pairs_run
    results = json.loads((out / "results.json").read_text())
    assert results["tests"] and not any("oracle" in (t["arm"], t["vs"]) for t in results["tests"])
    assert [t["arm"] for t in results["tests"] if t["primary"]] == ["learned"]
    verdict = (out / "report.md").read_text().split("## Verdict")[1].split("## ")[0]
    assert "learned" in verdict and "oracle" not in verdict


def test_a_primary_declared_in_the_config_is_adjusted_on_its_own_and_gates_the_rest(pairs_run, phantom_dir):
    out, cache = pairs_run
    cfg = _config(out.parent, phantom_dir, name="declared", diagnostic='true\nprimary = "learned"')
    assert main(["run", str(cfg)]) == 0  # every stage but the report comes from the cache
    undeclared = json.loads((out / "results.json").read_text())["tests"]
    tests = json.loads((out.parent / "declared" / "results.json").read_text())["tests"]
    assert [t["family"] for t in undeclared] == ["all"] * len(undeclared)
    first = [t for t in tests if t["family"] == "primary"]
    assert [(t["arm"], t["vs"], t["class"], t["primary"]) for t in first] == [("learned", "real-only", "all", True)]
    assert first[0]["p_holm"] == pytest.approx(first[0]["p_wilcoxon"])  # a family of one is not adjusted
    rest = [t for t in tests if t["family"] == "secondary"]
    assert len(rest) == len(tests) - 1 and all(t["p_holm"] >= first[0]["p_holm"] for t in rest if t["p_holm"])
    report = (out.parent / "declared" / "report.md").read_text()
    assert "The primary arm, learned, was declared in the config before the run" in report


def test_learned_set_records_its_volumes_and_checks_and_oracle_its_true_slices(pairs_run, phantom_data):
    _, cache = pairs_run
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    manifests = {}
    for m in (cache / "stages" / "synthesis").glob("*/set/manifest.json"):
        manifest = json.loads(m.read_text())
        manifests[manifest["generator"]] = manifest
    learned, oracle = manifests["learned"], manifests["oracle"]
    assert learned["unlabelled_volumes"] == sorted(fold.train)
    assert {r["volume"] for r in learned["training"]["pretrain"]} == set(fold.train)  # images only, no query
    checks = learned["checks"]
    assert 0 < checks["share_passed"] <= 1 and checks["dropped"] == checks["n_candidates"] - checks["n_passed"]
    assert len(learned["pairs"]) == 3 and all(p["volume"] in fold.train for p in learned["pairs"])
    assert oracle["diagnostic"] is True and {s["volume"] for s in oracle["source"]} <= set(fold.train)
    train = json.loads(next((cache / "stages" / "source-train").glob("*/config.json")).read_text())
    assert {r["volume"] for r in train["provenance"]["pretrain"]} == set(fold.train)
    evaluated = [json.loads(p.read_text())["fields"] for p in (cache / "stages" / "evaluate").glob("*/stage.json")]
    assert len(evaluated) == 3 and all(e["test_supports"] == {} for e in evaluated)  # at_test is off by default
    pools = [json.loads(p.read_text()) for p in (cache / "stages" / "finetune").glob("*/pool.json")]
    assert sorted((p["synthetic"], p["synthetic_share"]) for p in pools) == [(0, None), (3, 0.5), (3, 0.5)]


@pytest.mark.parametrize("diagnostic, role, message", [
    ("false", "diagnostic", r"arms \['oracle'\] have role = \"diagnostic\" outside a diagnostic run"),
    ("true", "augmented", r"\[arms.oracle\] sources = \['oracle'\] with role = 'augmented': \['oracle'\] read the "
                          r"training volumes' true labels, which Setting 1 forbids"),
    ('true\nscore_on = "training"', "diagnostic",
     r"\[arms.oracle\] sources = \['oracle'\]: \['oracle'\] read the training volumes' true labels, and "
     r"\[protocol\] score_on = \"training\" scores those volumes; drop the arm from the validation run"),
    ('true\nprimary = "oracle"', "diagnostic",
     r"\[protocol\] primary = 'oracle' is not an augmented arm of this config; choose one of \['learned'\]"),
])
def test_an_oracle_arm_outside_a_diagnostic_arm_and_run_stops_at_config_time(phantom_copy, tmp_path, capsys,
                                                                             diagnostic, role, message):
    cfg = _config(tmp_path, phantom_copy, name="o", diagnostic=diagnostic, oracle_role=role)
    before = snapshot(tmp_path)
    with pytest.raises(ConfigError, match=message):
        load(cfg)
    assert main(["run", str(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("supportforge: error: ") and "oracle" in err[0]
    assert snapshot(tmp_path) == before  # no run folder, no cache, the data folder untouched


def test_a_support_whose_warps_all_fail_stops_the_run_in_one_line_naming_the_pairs(phantom_copy, tmp_path, capsys):
    cfg = _config(tmp_path, phantom_copy, name="f", learned="min_similarity = 1.0")  # no warp can pass
    data_before = snapshot(phantom_copy)
    assert main(["run", str(cfg)]) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if line.startswith("supportforge: error")]  # not the log
    assert len(err) == 1, err
    assert err[0].startswith("supportforge: error: learned pairs, fold 0, class liver: support(s) [0, 1, 2]: every "
                             "candidate pair failed the checks (support 0 -> volume ")
    assert "similarity" in err[0] and "< 1.0" in err[0]
    assert snapshot(phantom_copy) == data_before
    assert [p.name for p in (tmp_path / "f").iterdir()] == ["run.log"]  # no report, results or stages record
    assert not list((tmp_path / "cache" / "stages").glob("synthesis/*/set"))  # no learned set was kept


def test_a_model_trained_at_another_resolution_is_refused_naming_the_pair(phantom_data, tmp_path):
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    config = LearnedConfig(resolution=16, channels=(8, 16, 16, 8), final_channels=(8,), integration_steps=2,
                           steps=1, batch_size=2, pool_size=2, candidates=1)
    rng = np.random.default_rng(0)
    small = {v: rng.random((6, 16, 16)).astype(np.float32) for v in fold.train}  # a 16 px model, 32 px data
    cache = StageCache(tmp_path / "cache")
    runner = StageRunner(cache, frozenset(), logging.getLogger("test"))
    volume_source("learned").train(config, volumes=small, fold=0, query_volumes=fold.queries, out_dir=tmp_path / "m")
    entry = StageEntry(tmp_path / "m", "m")  # what a source-train entry is: a folder with the model
    stage = Synthesis(source="learned", class_name="liver", n=2, seed=0, data=phantom_data, fold=fold, generator=entry,
                      sampling=volume_source("learned").pair_options(LearnedConfig(resolution=32)))
    with pytest.raises(DataError, match=r"^learned pairs, fold 0, class liver: .*trained at 16") as err:
        runner(stage)
    assert "\n" not in str(err.value)
    assert not cache.done("synthesis", stage.key())


def test_training_on_a_query_volume_is_refused_before_anything_is_written(phantom_data, tmp_path):
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    volumes = {v: phantom_data.volume(v).images for v in (*fold.train, fold.queries[0])}
    with pytest.raises(LeakageError, match=rf"query volumes \['{fold.queries[0]}'\]"):
        volume_source("learned").train(LearnedConfig(resolution=32, channels=(8, 16, 16, 8), steps=1),
                                       volumes=volumes, fold=0, query_volumes=fold.queries, out_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()


def test_finetune_draws_the_synthetic_share_of_episodes_from_the_synthetic_pairs(pairs_run, monkeypatch, tmp_path):
    from segment import train as seg_train
    from segment.pooling import SegmentInputError
    _, cache = pairs_run
    base = next((cache / "stages" / "segmenter").glob("*/model.pt"))
    seen = {}
    monkeypatch.setattr(seg_train, "_fit", lambda model, sampler, *a, **k: seen.setdefault("sampler", sampler))
    def pairs(n: int) -> tuple[torch.Tensor, torch.Tensor]:  # (n, 1, 32, 32): noise with a square organ
        masks = torch.zeros(n, 1, 32, 32)
        masks[..., 8:20, 8:20] = 1.0
        return torch.rand(n, 1, 32, 32, generator=torch.Generator().manual_seed(n)), masks

    real, syn = pairs(3), pairs(9)
    seg_train.finetune(base, *real, out_dir=tmp_path / "ft", steps=2, synthetic=syn, synthetic_share=0.25)
    sampler = seen["sampler"]
    assert sampler.names == ("pairs", "synthetic") and list(sampler.weights) == [0.75, 0.25]
    assert [len(s.images) for s in sampler.samplers] == [3, 9]  # real and synthetic sampled separately
    with pytest.raises(SegmentInputError, match=r"synthetic_share = 0.5 needs synthetic pairs and a value in \[0, 1\)"):
        seg_train.finetune(base, *real, out_dir=tmp_path / "ft2", steps=2, synthetic_share=0.5)


def test_propagated_arm_needs_no_section_and_pairs_the_support_volume_s_own_slices(phantom_copy, tmp_path):
    cfg = tmp_path / "p.toml"
    cfg.write_text(REAL_AND_PROPAGATED.format(data=phantom_copy, out=tmp_path / "p", cache=tmp_path / "cache",
                                              diagnostic="false", learned=""))
    assert main(["run", str(cfg)]) == 0
    results = json.loads((tmp_path / "p" / "results.json").read_text())
    assert {r["arm"]: (r["role"], r["synthetic_pairs"]) for r in results["rows"]} == {
        "real-only": ("baseline", None), "propagated": ("augmented", 3)}
    manifest = json.loads(next((tmp_path / "cache" / "stages").glob("synthesis/*/set/manifest.json")).read_text())
    support = {s["volume"] for s in manifest["support"]}
    assert manifest["generator"] == "propagated" and len(support) == 1
    assert {r["volume"] for r in manifest["training"]["derived"]} == support   # no training or query volume
    supports = {s["slice"] for s in manifest["support"]}
    assert all(p["slice"] not in supports and 1 <= abs(p["offset"]) <= 2 for p in manifest["pairs"])
    assert not list((tmp_path / "cache" / "stages").glob("source-train/*"))     # it trains no model


def test_a_validation_run_scores_the_training_volumes_and_its_fine_tunes_serve_the_query_run(phantom_copy, phantom_data,
                                                                                           tmp_path):
    """score_on = "training" never scores a query volume; the fine-tunes it chose settings with are the very
    ones the run on the query volumes then scores (the same cache entries, not retrained)."""
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    runs = {}
    for name, score_on in (("v", "training"), ("q", "queries")):
        cfg = tmp_path / f"{name}.toml"
        cfg.write_text(REAL_AND_PROPAGATED.format(data=phantom_copy, out=tmp_path / name, cache=tmp_path / "cache",
                                                  learned="", diagnostic=f'false\nscore_on = "{score_on}"'))
        assert main(["run", str(cfg)]) == 0
        runs[name] = json.loads((tmp_path / name / "results.json").read_text())
        runs[name]["stages"] = json.loads((tmp_path / name / "stages.json").read_text())["summary"]
    scored = {name: {r["query"] for r in res["rows"]} for name, res in runs.items()}
    assert scored["v"] and scored["v"] <= set(fold.train) and not scored["v"] & set(fold.queries)
    assert scored["q"] <= set(fold.queries)
    assert runs["v"]["score_on"] == "training" and runs["q"]["score_on"] == "queries"
    assert (tmp_path / "v" / "report.md").read_text().split("\n")[2].startswith("**Validation run:** the folds' "
                                                                                   "training volumes are scored")
    assert "Validation run" not in (tmp_path / "q" / "report.md").read_text()
    assert runs["q"]["stages"]["finetune"] == {"ran": 0, "cached": 2}   # the validation run's fine-tunes
    assert runs["q"]["stages"]["evaluate"]["ran"] == 2                  # scored anew on the query volumes
