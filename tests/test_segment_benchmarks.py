"""The segmenter benchmarks' own options: config overrides of segment_fewshot and the FLOP count of segment_flops."""

from __future__ import annotations

import json

import pytest

from files import benchmark_module


@pytest.fixture(scope="module")
def fewshot():
    return benchmark_module("segment_fewshot")


def test_overrides_are_typed_and_apply_per_model(fewshot):
    args = fewshot.parse_args(["--set", "neighbour_span=2", "augment=false", "bg_weight=0.2",
                               "--conditional-set", "spatial_gates=true", "neighbour_span=1"])
    proto, cond = fewshot.model_config("prototype", args), fewshot.model_config("conditional", args)
    assert (proto.neighbour_span, proto.augment, proto.bg_weight, proto.spatial_gates) == (2, False, 0.2, False)
    assert (cond.neighbour_span, cond.spatial_gates, cond.steps) == (1, True, args.conditional_steps)
    plain = fewshot.model_config("prototype", fewshot.parse_args([]))
    assert fewshot.cfg_key(plain) != fewshot.cfg_key(proto)  # an override gets its own run folder


@pytest.mark.parametrize("pair, message", [
    ("neighbour_spam=2", "expected KEY=VALUE with KEY one of"),
    ("neighbour_span", "expected KEY=VALUE"),
    ("neighbour_span=two", "neighbour_span takes a int"),
    ("augment=maybe", "augment takes a bool"),
])
def test_bad_overrides_fail_naming_the_pair(fewshot, pair, message):
    args = fewshot.parse_args(["--set", pair])
    with pytest.raises(SystemExit, match=message):
        fewshot.model_config("prototype", args)


def test_override_values_are_still_validated(fewshot):
    args = fewshot.parse_args(["--set", "neighbour_span=-3"])
    with pytest.raises(ValueError, match="neighbour_span must be >= 0, got -3"):
        fewshot.model_config("prototype", args)


def test_flops_benchmark_counts_and_times_a_tiny_model(tmp_path):
    flops = benchmark_module("segment_flops")
    out = tmp_path / "flops.json"
    result = flops.main(["--sizes", "prototype:4:2:32:fused", "conditional:4:2:32:positional", "--steps", "1", "--repeats", "1",
                         "--mm-size", "128", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert saved["sizes"] == json.loads(json.dumps(result["sizes"])) and out.with_suffix(".md").is_file()
    proto, cond = saved["sizes"]
    assert proto["model"] == "prototype" and cond["model"] == "conditional"
    for row in saved["sizes"]:
        # a training step (forward + backward) costs more than one forward inference call of 1 + 8 images
        assert 0 < row["infer_gflop_per_call"] and 0 < row["train_gflop_per_step"]
        assert row["train_fraction"] == pytest.approx(row["train_gflop_per_s"] / saved["matmul_gflop_per_s"])
        assert row["train_steps_per_s"] > 0 and row["infer_calls_per_s"] > 0
    wider = flops.measure("prototype:8:2:32:fused", flops.parse_args(["--steps", "1", "--repeats", "1"]))
    # convolutions grow ~ width^2; the embedding and the scoring do not
    assert wider["train_gflop_per_step"] > 1.5 * proto["train_gflop_per_step"]


def test_curve_scores_each_stop_of_one_run(phantom_dir, tmp_path):
    curve = benchmark_module("segment_curve")
    result = curve.main(["--spec", str(phantom_dir / "dataset.toml"), "--data", str(phantom_dir), "--fold", "0",
                         "--steps", "4", "--every", "2", "--set", "resolution=32", "width=4", "dilated_blocks=1",
                         "embed_dim=8", "batch=1", "warmup=1", "--cache", str(tmp_path / "cache"),
                         "--runs", str(tmp_path / "runs"), "--out", str(tmp_path / "out"), "--tag", "t"])
    assert [p["step"] for p in result["points"]] == [2, 4]
    assert all(0.0 <= p["mean"] <= 1.0 for p in result["points"])
    assert result["points"][1]["train_seconds"] >= result["points"][0]["train_seconds"]
    saved = json.loads((tmp_path / "out" / "segment_curve_t.json").read_text())
    assert saved["points"] == json.loads(json.dumps(result["points"])) and saved["config"]["steps"] == 4
    (model_dir,) = (tmp_path / "runs").glob("*/*/fold0")
    assert (model_dir / "model.pt").is_file() and not (model_dir / "last.pt").exists()  # the run finished
