"""The `supportforge` sub-commands of the foundation, run in-process as a user would call them."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np

from pipelines.cli import main


def test_prepare_prints_the_summary(phantom_dir, tmp_path, capsys):
    assert main(["prepare", str(phantom_dir), "--resolution", "32", "--cache", str(tmp_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["volumes"] == 6 and summary["slices"] == 6 * 16
    assert summary["slices_per_class"]["liver"] > 0 and len(summary["folds"]) == 2
    assert summary["folds"][1]["support"] == "1"  # fold 1 wraps around to position 0


def test_oracle_evaluation_scores_one(phantom_dir, tmp_path, capsys):
    out = tmp_path / "oracle.json"
    assert main(["evaluate", str(phantom_dir), "--resolution", "32", "--cache", str(tmp_path / "c"),
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())
    assert results["EP1"]["mean"] == 1.0 and results["EP2"]["mean"] == 1.0
    assert "EP1 oracle: mean Dice 100.0" in capsys.readouterr().out


def test_support_without_the_class_exits_2_and_writes_nothing(phantom_copy, tmp_path, capsys):
    # Fold 1's support is volume 1: remove its spleen.
    path = phantom_copy / "label_1.nii.gz"
    label = np.asarray(nib.load(path).dataobj).copy()
    label[label == 4] = 0
    nib.save(nib.Nifti1Image(label, np.eye(4)), path)
    out = tmp_path / "oracle.json"
    code = main(["evaluate", str(phantom_copy), "--resolution", "32", "--cache", str(tmp_path / "c"),
                 "--out", str(out)])
    assert code == 2 and not out.exists()
    assert "label_1.nii.gz: class 'spleen' is absent from the support volume of fold 1" in capsys.readouterr().err


def test_missing_spec_is_one_clear_line(tmp_path, capsys):
    (tmp_path / "image_1.nii.gz").write_bytes(b"")
    assert main(["prepare", str(tmp_path)]) == 2
    assert "has no dataset.toml; name a spec (abd_ct, abd_mri, card_mri" in capsys.readouterr().err


def test_run_folds_and_seeds_replace_those_of_the_config(tmp_path, monkeypatch):
    import pipelines.runner

    config = tmp_path / "c.toml"
    config.write_text('name = "split"\n[data]\nphantom = true\n[protocol]\nfolds = [0, 1]\nseeds = [0]\n'
                      'classes = ["liver"]\n[run]\nout = "run"\n')
    seen = []

    def fake_run(cfg, *, force):
        seen.append(cfg.protocol)
        return {"out": tmp_path / "run", "summary": {}, "failed_units": []}

    monkeypatch.setattr(pipelines.runner, "run_experiment", fake_run)
    assert main(["run", str(config), "--folds", "1", "--seeds", "2", "3"]) == 0
    assert main(["run", str(config)]) == 0
    assert [(p.folds, p.seeds, p.classes) for p in seen] == [((1,), (2, 3), ("liver",)), ((0, 1), (0,), ("liver",))]
