"""Training on the phantom with tiny models (32 px, a few steps): checkpoint, resume, determinism,
fine-tuning, the evaluator round trip, and two gloo processes under torchrun."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from segment.pooling import SegmentInputError
from segment.predict import make_predictor
from segment.data.protocol import evaluate, make_folds
from segment.train import CheckpointError, SegmenterConfig, finetune, load, train



ROOT = Path(__file__).resolve().parents[1]
CFG = SegmenterConfig(width=4, depth=2, dilated_blocks=1, embed_dim=8, resolution=32, steps=6, batch=2,
                      warmup=2, checkpoint_every=3, mix_superpixel=1.0, mix_supervised=1.0, cpu=True)


@pytest.fixture(scope="module")
def fold(phantom_data):
    return make_folds(sorted(phantom_data.ids, key=int), phantom_data.spec.n_folds)[0]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(params=["prototype", "conditional"])
def cfg(request) -> SegmenterConfig:
    return replace(CFG, model=request.param)


def test_train_writes_a_checkpoint_that_rebuilds_and_evaluates(cfg, phantom_data, fold, tmp_path):
    path = train(cfg, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "run")
    assert path == tmp_path / "run" / "model.pt" and not (tmp_path / "run" / "last.pt").exists()
    meta = json.loads((tmp_path / "run" / "config.json").read_text())
    assert meta["config"]["model"] == cfg.model and meta["train_volumes"] == list(fold.train)
    model = load(path)
    result = evaluate(make_predictor(model), phantom_data, [fold], classes=["liver"], protocol="EP1")
    assert 0.0 <= result["mean"] <= 1.0
    # same out_dir, same config: the finished run is returned, not retrained
    assert train(cfg, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "run") == path


def test_seeded_training_is_deterministic_on_cpu(cfg, phantom_data, fold, tmp_path):
    kw = dict(test_class_ids=(1,), setting=1)
    a = train(cfg, phantom_data, fold, out_dir=tmp_path / "a", **kw)
    b = train(cfg, phantom_data, fold, out_dir=tmp_path / "b", **kw)
    c = train(replace(cfg, seed=1), phantom_data, fold, out_dir=tmp_path / "c", **kw)
    assert same(weights(a), weights(b))
    assert not same(weights(a), weights(c))


def test_resume_after_interruption_matches_an_uninterrupted_run(phantom_data, fold, tmp_path):
    kw = dict(test_class_ids=(2,), setting=1)
    whole = train(CFG, phantom_data, fold, out_dir=tmp_path / "whole", **kw)
    part = train(CFG, phantom_data, fold, out_dir=tmp_path / "cut", stop_at=3, **kw)
    assert part.name == "last.pt" and not (tmp_path / "cut" / "model.pt").exists()
    assert torch.load(part, weights_only=True)["step"] == 3
    resumed = train(CFG, phantom_data, fold, out_dir=tmp_path / "cut", **kw)
    assert same(weights(whole), weights(resumed))


def test_a_checkpoint_from_another_config_is_not_resumed(phantom_data, fold, tmp_path):
    train(CFG, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "run", stop_at=3)
    with pytest.raises(ValueError, match=r"written by another config .*'lr'"):
        train(replace(CFG, lr=0.5), phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "run")
    with pytest.raises(ValueError, match=r"written for another run .*'test_class_ids'"):
        train(CFG, phantom_data, fold, test_class_ids=(2,), setting=1, out_dir=tmp_path / "run")


def test_bad_training_inputs_fail_before_writing(phantom_data, fold, tmp_path):
    with pytest.raises(ValueError, match="prepared at resolution 32 but the config says 64"):
        train(replace(CFG, resolution=64), phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "r")
    with pytest.raises(ValueError, match=r"test_class_ids \[7\]"):
        train(CFG, phantom_data, fold, test_class_ids=(7,), setting=1, out_dir=tmp_path / "r")
    with pytest.raises(SegmentInputError, match="extra_pairs masks"):
        train(CFG, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "r",
              extra_pairs=(torch.randn(2, 1, 32, 32), torch.zeros(2, 1, 16, 16)))
    assert not (tmp_path / "r").exists()


def test_finetune_on_a_pool_of_novel_class_pairs(phantom_data, fold, tmp_path):
    base = train(CFG, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "base")
    vol = phantom_data.volume(fold.support)
    zs = vol.slices_with(1)[::2]
    images = torch.from_numpy(vol.images[zs])[:, None]
    masks = torch.from_numpy((vol.labels[zs] == 1).astype("float32"))[:, None]
    tuned = finetune(base, images, masks, out_dir=tmp_path / "tuned", steps=3)
    assert tuned.is_file() and not same(weights(base), weights(tuned))
    state = torch.load(tuned, weights_only=True)
    assert state["config"]["steps"] == 3 and state["meta"]["pool_size"] == len(zs)
    assert load(tuned).segment(images[:1], masks[:1], images).shape == images.shape


def test_two_gloo_processes_under_torchrun(phantom_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "tests" / "segment_ddp_worker.py"), str(phantom_dir), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = sorted(json.loads(p.read_text())["rank"] for p in tmp_path.glob("rank*.json"))
    assert ranks == [0, 1]
    state = torch.load(tmp_path / "run" / "model.pt", weights_only=True)
    assert state["meta"]["processes"] == 2 and state["step"] == 4


def test_training_can_start_from_a_local_encoder_checkpoint(phantom_data, fold, tmp_path):
    base = train(CFG, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "base")
    encoder = {k.removeprefix("encoder."): v for k, v in weights(base).items() if k.startswith("encoder.")}
    torch.save({"encoder": encoder}, tmp_path / "enc.pt")
    cfg = replace(CFG, steps=1, lr=1e-9, warmup=1, encoder_init=str(tmp_path / "enc.pt"))
    tuned = weights(train(cfg, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "init"))
    assert torch.allclose(tuned["encoder.head.weight"], encoder["head.weight"], atol=1e-6)
    with pytest.raises(ValueError, match="needs the prototype model"):
        train(replace(cfg, model="conditional"), phantom_data, fold, test_class_ids=(1,), setting=1,
              out_dir=tmp_path / "bad")
    assert not (tmp_path / "bad").exists()


# ---- issue 9 item 2: a checkpoint is never unpickled into code -------------------------------------

class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: stands in for a pickle whose `__reduce__` runs a command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _crafted(path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({"config": {}, "state_dict": _RunsCode(marker), "encoder": _RunsCode(marker)},
                                  protocol=2))
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CRAFTED_AT = {"load model.pt": "evil/model.pt", "finetune from model.pt": "evil/model.pt",
              "resume last.pt": "run/last.pt", "encoder_init": "evil/enc.pt"}


@pytest.mark.parametrize("where", list(CRAFTED_AT))
def test_crafted_pickle_checkpoint_is_refused_and_never_run(where, phantom_data, fold, tmp_path):
    marker, run = tmp_path / "MARKER", tmp_path / "run"
    crafted = _crafted(tmp_path / CRAFTED_AT[where], marker)
    images, masks = torch.randn(2, 1, 32, 32), torch.zeros(2, 1, 32, 32)
    kw = dict(test_class_ids=(1,), setting=1, out_dir=run)
    calls = {"load model.pt": lambda: load(crafted),
             "finetune from model.pt": lambda: finetune(crafted, images, masks, out_dir=run, steps=2),
             "resume last.pt": lambda: train(CFG, phantom_data, fold, **kw),
             "encoder_init": lambda: train(replace(CFG, encoder_init=str(crafted)), phantom_data, fold, **kw)}
    before = _listing(tmp_path)
    with pytest.raises(CheckpointError, match=r"checkpoint .* cannot be read as tensors only \(weights_only=True\): "
                                              r"Unsupported global: GLOBAL io.open"):
        calls[where]()
    assert not marker.exists() and _listing(tmp_path) == before  # nothing ran, nothing was written


def test_truncated_segmenter_checkpoint_names_the_file(phantom_data, fold, tmp_path):
    path = train(CFG, phantom_data, fold, test_class_ids=(1,), setting=1, out_dir=tmp_path / "run")
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"segmenter checkpoint {path} cannot be read as tensors only"):
        load(path)
