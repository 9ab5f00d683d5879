"""A second anatomy without code changes: a cardiac-like phantom on the built-in `card_mri` spec layout
(raw labels 200 / 500 / 600), through the protocol and the few-shot benchmark's own code path."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from pipelines.cli import main as cli_main
from segment.data.protocol import evaluate, make_folds, oracle_predictor
from segment.data.slices import prepare
from segment.data.volumes import load_spec
from segment.train import read_checkpoint
from files import benchmark_module

ROOT = Path(__file__).resolve().parents[1]


def _heart(rng: np.random.Generator, size: int, depth: int) -> tuple[np.ndarray, np.ndarray]:
    """Image (Z, H, W) and raw labels: LV blood pool (500) in a myocardium ring (200), RV (600) beside it,
    inside a body outline; the LV spans slices 4..Z-2 and the RV 1..Z-5, so Setting 2 keeps three or more slices
    of either group's volumes with the other group's classes in them (its supervised episodes)."""
    z, y, x = np.meshgrid(np.arange(depth), np.arange(size), np.arange(size), indexing="ij")  # each (Z, H, W)
    cy, cx = size * rng.uniform(0.45, 0.55), size * rng.uniform(0.5, 0.6)
    taper = 1.0 - 0.5 * np.abs(z - (depth - 1) / 2) / depth  # smaller towards base and apex
    r = np.hypot(y - cy, x - cx)
    lv_slices, rv_slices = (z >= 4) & (z <= depth - 2), (z >= 1) & (z <= depth - 5)
    pool = (r <= 0.12 * size * taper) & lv_slices
    ring = (r > 0.12 * size * taper) & (r <= 0.2 * size * taper) & lv_slices
    rv = (np.hypot(y - cy, x - (cx - 0.28 * size)) <= 0.13 * size * taper) & ~ring & ~pool & rv_slices
    body = ((y - size / 2) / (0.42 * size)) ** 2 + ((x - size / 2) / (0.47 * size)) ** 2 <= 1.0
    labels = np.zeros(z.shape, dtype=np.uint16)
    labels[ring], labels[pool], labels[rv] = 200, 500, 600
    image = np.where(pool | rv, 0.9, np.where(ring, 0.25, np.where(body, 0.5 + 0.1 * (x > size * 0.7), 0.05)))
    image = image + 0.05 * rng.standard_normal(z.shape)
    return (1000.0 * image).astype(np.float32), labels


@pytest.fixture(scope="module")
def heart_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("card")
    for i in range(1, 7):  # 6 volumes: 5 folds of one query and one support each
        image, labels = _heart(np.random.default_rng(i), size=40, depth=12)
        for name, array in (("image", image), ("label", labels)):
            nib.save(nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), np.eye(4)),
                     out / f"{name}_{i}.nii.gz")
    return out


def _tree_digest(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


def test_card_mri_oracle_scores_one_on_the_native_grid(heart_dir, tmp_path):
    spec = load_spec("card_mri")
    data = prepare(spec, heart_dir, resolution=32, cache_dir=tmp_path)
    v = data.volume("1")
    assert v.native_labels.shape == (12, 40, 40) and v.labels.shape == (12, 32, 32)
    assert set(np.unique(v.native_labels)) == {0, 1, 2, 3}  # 200 / 500 / 600 -> class ids 1 / 2 / 3
    folds = make_folds(data.ids, spec.n_folds)
    for protocol in ("EP1", "EP2"):
        res = evaluate(oracle_predictor(data), data, folds, classes=spec.classes, protocol=protocol)
        assert res["dice_grid"] == "native" and res["mean"] == 1.0 and res["mean_post"] == 1.0
        assert set(res["per_class"]) == {"lv_myocardium", "lv_blood_pool", "rv"}


def test_fewshot_benchmark_runs_both_settings_on_card_mri(heart_dir, tmp_path):
    bench = benchmark_module("segment_fewshot")
    out = tmp_path / "results"
    results = bench.main(["--spec", "card_mri", "--data", str(heart_dir), "--setting", "1", "2", "--folds", "0",
                          "--steps", "2", "--conditional-steps", "2", "--width", "4", "--batch", "1",
                          "--resolution", "32", "--jobs", "1", "--cache", str(tmp_path / "cache"),
                          "--runs", str(tmp_path / "runs"), "--out", str(out), "--finetune-steps", "2"])
    assert sorted(results) == [1, 2]
    for setting in (1, 2):
        saved = json.loads((out / f"segment_card_mri_setting{setting}.json").read_text())
        assert (out / f"segment_card_mri_setting{setting}.md").is_file()
        assert saved["spec"] == "card_mri" and saved["setting"] == setting
        assert saved["dice_grid"] == "native" and saved["postprocess"] is False
        for kind in ("prototype", "conditional"):
            for protocol in ("EP1", "EP2"):
                h = saved["headline"][kind][protocol]
                assert h["dice_grid"] == "native" and h["postprocess"] is False
                assert 0.0 <= h["mean"] <= 1.0 and 0.0 <= h["mean_post"] <= 1.0
                assert set(h["per_class"]) == {"lv_myocardium", "lv_blood_pool", "rv"}
                if kind == "prototype":  # fine-tuned on the supports, and scored before and after
                    assert h["finetune_steps"] == 2 and 0.0 <= h["base_mean"] <= 1.0
                else:  # the conditional net is not fine-tuned by default
                    assert h["finetune_steps"] == 0 and "base_mean" not in h
    # Test-time fine-tuning reads only the support slices the protocol gives: 3 for EP1, 1 for EP2.
    tuned = sorted((tmp_path / "runs").rglob("finetune2-*/model.pt"))
    assert len(tuned) == 2 * 2 * 3 and all("/prototype-" in str(p) for p in tuned)  # settings x protocols x classes
    for path in tuned:
        meta = read_checkpoint(path)["meta"]
        assert meta["stage"] == "finetune" and meta["pool_size"] == (3 if "-EP1-" in str(path) else 1)
    # Setting 2 trains one model per class group: its training slices hold no class of the group. In Setting 1
    # the prototype net learns from supervised episodes of the other groups' labels, so it too is one model per
    # group; the conditional net, without them, is one model for every class.
    groups = [["lv_myocardium", "lv_blood_pool"], ["rv"]]
    for setting, kind, splits, mix in ((2, "prototype", groups, 1.0), (2, "conditional", groups, 0.0),
                                       (1, "prototype", groups, 1.0),
                                       (1, "conditional", [["lv_myocardium", "lv_blood_pool", "rv"]], 0.0)):
        model = json.loads((out / f"segment_card_mri_setting{setting}.json").read_text())["models"][kind]
        assert model["splits"] == splits and model["config"]["mix_supervised"] == mix
        sources = {("supervised" in v) for v in model["episode_sources"].values()}  # as each checkpoint records
        assert sources == {mix > 0}


def test_benchmark_data_default_is_relative_to_the_repo_root():
    args = benchmark_module("segment_fewshot").parse_args([])
    assert Path(args.data) == (ROOT / ".." / "shared" / "data" / "chaos_t2").resolve()
    assert args.spec == "abd_mri" and args.setting == [1, 2]


def test_cli_unknown_dice_grid_exits_2_and_writes_nothing(heart_dir, tmp_path, capsys):
    before = _tree_digest(heart_dir)
    out = tmp_path / "oracle.json"
    with pytest.raises(SystemExit) as err:
        cli_main(["evaluate", str(heart_dir), "--spec", "card_mri", "--resolution", "32", "--cache",
                  str(tmp_path / "c"), "--dice-grid", "coarse", "--out", str(out)])
    assert err.value.code == 2
    assert "argument --dice-grid: invalid choice: 'coarse'" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "c").exists() and _tree_digest(heart_dir) == before


def test_cli_evaluate_records_the_grid(heart_dir, tmp_path, capsys):
    out = tmp_path / "oracle.json"
    assert cli_main(["evaluate", str(heart_dir), "--spec", "card_mri", "--resolution", "32", "--cache",
                     str(tmp_path / "c"), "--dice-grid", "working", "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert saved["EP1"]["dice_grid"] == "working" and saved["EP1"]["mean"] == 1.0
    assert "EP1 oracle: mean Dice 100.0 on the working grid" in capsys.readouterr().out
