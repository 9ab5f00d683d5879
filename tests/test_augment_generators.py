"""Shared checks run on every generator (round trip, shape, seeded determinism) plus the issue's bad inputs."""
import json
import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from augment import ddpm, gan
from augment.manifest import LeakageError
from augment.pairs import PairError
from augment.manifest import SliceRef
from augment.synthesis import synthesize
from augment.training import CHECKPOINT_FILE, META_FILE, CheckpointError, file_hash, load_checkpoint
from augment_helpers import RES, ellipse_masks, images_for, provenance, tiny_ddpm, tiny_gan

GENERATORS = {
    "ddpm-eps-dpm": (ddpm, lambda **c: tiny_ddpm(**c)),
    "ddpm-v-ddim-joint": (ddpm, lambda **c: tiny_ddpm(prediction_type="v_prediction", sampler="ddim",
                                                     joint=True, **c)),
    "gan": (gan, lambda **c: tiny_gan(**c)),
}


@pytest.fixture(scope="module")
def data():
    masks = ellipse_masks(8, seed=0)
    return images_for(masks), masks


@pytest.fixture(scope="module", params=list(GENERATORS))
def trained(request, data, tmp_path_factory):
    module, make = GENERATORS[request.param]
    images, masks = data
    out = tmp_path_factory.mktemp(request.param)
    path = module.train(make(), pretrain_pairs=(images, masks), finetune_pairs=(images[:3], masks[:3]),
                        provenance=provenance(8, 3), out_dir=out)
    return request.param, module, make, path


def test_checkpoint_carries_config_and_provenance(trained):
    name, module, make, path = trained
    ckpt = load_checkpoint(path, kind=module.KIND)
    assert ckpt["config"]["resolution"] == RES
    assert len(ckpt["provenance"]["pretrain"]) == 8 and len(ckpt["provenance"]["finetune"]) == 3
    meta = json.loads((path.parent / "config.json").read_text())
    assert meta["weights_sha256"] == ckpt["sha256"] and meta["kind"] == module.KIND and meta["format"] == 2
    model, config, _ = module.load(path)
    assert config == make()  # the file alone rebuilds the same config


def test_sample_shape_and_seeded_determinism(trained, data):
    name, module, _, path = trained
    masks = torch.from_numpy(data[1][:5])
    a, ma = module.sample(path, masks, seed=1)
    b, _ = module.sample(path, masks, seed=1)
    c, _ = module.sample(path, masks, seed=2)
    assert a.shape == ma.shape == (5, 1, RES, RES)
    assert torch.isfinite(a).all()
    assert torch.equal(a, b) and not torch.equal(a, c)
    if name.endswith("joint"):
        assert set(torch.unique(ma).tolist()) <= {0.0, 1.0}
    else:
        assert torch.equal(ma, masks)


def test_save_load_round_trip_and_finetune_from_init(trained, data, tmp_path):
    name, module, make, path = trained
    images, masks = data
    # fine-tuning from the checkpoint with zero steps reproduces its weights exactly
    path2 = module.train(make(finetune_steps=0), finetune_pairs=(images[:2], masks[:2]),
                         provenance=provenance(0, 2), out_dir=tmp_path, init_checkpoint=path)
    a, _ = module.sample(path, masks[:3], seed=0)
    b, _ = module.sample(path2, masks[:3], seed=0)
    assert torch.allclose(a, b, atol=1e-5)
    # the new checkpoint lists the init checkpoint's slices as well
    prov = load_checkpoint(path2, kind=module.KIND)["provenance"]
    assert len(prov["pretrain"]) == 8 + 3 and len(prov["finetune"]) == 2


def test_training_is_seeded(data, tmp_path):
    images, masks = data
    paths = [ddpm.train(tiny_ddpm(), pretrain_pairs=(images, masks), provenance=provenance(8, 0),
                        out_dir=tmp_path / str(k)) for k in range(2)]
    w = [load_checkpoint(p, kind="ddpm")["state"]["unet"] for p in paths]
    assert all(torch.equal(w[0][k], w[1][k]) for k in w[0])


def test_reference_pipeline_runs_on_the_same_model(data, tmp_path):
    images, masks = data
    path = ddpm.train(tiny_ddpm(), pretrain_pairs=data, provenance=provenance(8, 0), out_dir=tmp_path)
    pipe = ddpm.reference_pipeline(path, masks[:2])
    assert pipe.unet.unet.state_dict()["conv_in.weight"].equal(ddpm.load(path)[0].state_dict()["conv_in.weight"])
    out = pipe(batch_size=2, num_inference_steps=3, output_type="np")
    assert out.images.shape == (2, RES, RES, 1)
    with pytest.raises(ValueError, match="conditional mode only"):
        ddpm.reference_pipeline(ddpm.train(tiny_ddpm(joint=True), pretrain_pairs=data, provenance=provenance(8, 0),
                                           out_dir=tmp_path / "joint"), masks[:2])


# ---- bad input: clear error, nothing written -------------------------------------------------------

def _bad(kind: str, images: np.ndarray, masks: np.ndarray):
    images, masks = images.copy(), masks.copy()
    if kind == "empty mask":
        masks[2] = 0
    elif kind == "all-foreground mask":
        masks[1] = 1
    elif kind == "size mismatch":
        masks = ellipse_masks(8, res=RES * 2)
    elif kind == "non-binary mask":
        masks[0, 0, 5, 5] = 0.3
    elif kind == "nan image":
        images[3, 0, 1, 1] = np.nan
    elif kind == "zero pairs":
        images, masks = images[:0], masks[:0]
    return images, masks


BAD = {"empty mask": "empty", "all-foreground mask": "all foreground", "size mismatch": "expected 32x32",
       "non-binary mask": "binary", "nan image": "NaN", "zero pairs": "holds 0"}


@pytest.mark.parametrize("module, make", [(ddpm, tiny_ddpm), (gan, tiny_gan)], ids=["ddpm", "gan"])
@pytest.mark.parametrize("kind", list(BAD))
def test_bad_training_input_raises_and_writes_nothing(module, make, kind, data, tmp_path):
    images, masks = _bad(kind, *data)
    out = tmp_path / "ckpt"
    with pytest.raises(PairError, match=BAD[kind]):
        module.train(make(), pretrain_pairs=(images, masks), provenance=provenance(len(images), 0), out_dir=out)
    assert not out.exists()


@pytest.mark.parametrize("module, make", [(ddpm, tiny_ddpm), (gan, tiny_gan)], ids=["ddpm", "gan"])
def test_no_training_pairs_and_miscounted_provenance(module, make, data, tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(PairError, match="zero training pairs"):
        module.train(make(), provenance=provenance(0, 0), out_dir=out)
    with pytest.raises(PairError, match="provenance.pretrain lists 5 slices but pretrain_pairs holds 8"):
        module.train(make(), pretrain_pairs=data, provenance=provenance(5, 0), out_dir=out)
    assert not out.exists()


@pytest.mark.parametrize("module, make", [(ddpm, tiny_ddpm), (gan, tiny_gan)], ids=["ddpm", "gan"])
def test_query_volume_in_training_data_is_refused(module, make, data, tmp_path):
    out = tmp_path / "ckpt"
    with pytest.raises(LeakageError, match=r"query volumes \['3'\]"):
        module.train(make(), pretrain_pairs=data, provenance=provenance(8, 0, pre_volume="3"), out_dir=out)
    assert not out.exists()


def test_checkpoint_from_another_resolution_is_refused(trained, data, tmp_path):
    name, module, make, path = trained
    big = ellipse_masks(2, res=RES * 2)
    with pytest.raises(PairError, match="trained at 32x32, but the input is 64x64"):
        module.sample(path, big, seed=0)
    out = tmp_path / "ckpt"
    cfg64 = make(resolution=RES * 2)
    with pytest.raises(PairError, match="trained at 32x32, but the input is 64x64"):
        module.train(cfg64, finetune_pairs=(images_for(big), big), provenance=provenance(0, 2), out_dir=out,
                     init_checkpoint=path)
    assert not out.exists()


def test_bad_config_values_list_the_choices():
    with pytest.raises(ValueError, match=r"sampler='euler'; valid: \['ddim', 'dpmsolver\+\+'\]"):
        tiny_ddpm(sampler="euler")
    with pytest.raises(ValueError, match="prediction_type"):
        tiny_ddpm(prediction_type="sample")
    with pytest.raises(ValueError, match="divisible"):
        tiny_gan(resolution=30)


# ---- issue 9 item 2: a checkpoint is never unpickled into code -------------------------------------

class _RunsCode:
    """Unpickling this calls `open(marker, "w")`: stands in for a pickle whose `__reduce__` runs a command."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _tamper(folder: Path, case: str, marker: Path) -> None:
    weights, meta_path = folder / CHECKPOINT_FILE, folder / META_FILE
    meta = json.loads(meta_path.read_text())
    if case.startswith("code pickle"):
        weights.write_bytes(pickle.dumps({"unet": _RunsCode(marker), "generator": _RunsCode(marker)}, protocol=2))
    elif case == "truncated weights, hash updated":
        weights.write_bytes(weights.read_bytes()[:200])
    elif case == "no config.json":
        meta_path.unlink()
    elif case == "config.json not JSON":
        meta_path.write_bytes(b"\xff{not json")
    elif case == "old format":  # format 1 kept everything in a pickled checkpoint.pt
        meta.pop("format")
    if case.endswith("hash updated"):
        meta["weights_sha256"] = file_hash(weights)
    if case in ("code pickle, hash updated", "truncated weights, hash updated", "old format"):
        meta_path.write_text(json.dumps(meta))


TAMPERED = {"code pickle": "has SHA-256 .* but config.json beside it was written for",
            "code pickle, hash updated": r"cannot be read as tensors only \(weights_only=True\).* was not run",
            "truncated weights, hash updated": r"cannot be read as tensors only \(weights_only=True\)",
            "no config.json": "has no config.json beside it",
            "config.json not JSON": "is not valid JSON",
            "old format": "not a SupportForge generator checkpoint of format 2"}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoint_is_refused_and_never_run(case, trained, data, tmp_path):
    name, module, make, path = trained
    folder = tmp_path / "gen"
    shutil.copytree(path.parent, folder)
    marker = tmp_path / "MARKER"
    _tamper(folder, case, marker)
    images, masks = data
    out = tmp_path / "finetuned"
    calls = [lambda: module.load(folder / CHECKPOINT_FILE),
             lambda: module.sample(folder / CHECKPOINT_FILE, masks[:2], seed=0),
             lambda: synthesize(folder / CHECKPOINT_FILE, images[:3], masks[:3], [SliceRef("2", k) for k in range(3)],
                                n=2, seed=0),
             lambda: module.train(make(), finetune_pairs=(images[:2], masks[:2]), provenance=provenance(0, 2),
                                  out_dir=out, init_checkpoint=folder / CHECKPOINT_FILE)]
    for call in calls:
        with pytest.raises(CheckpointError, match=TAMPERED[case]):
            call()
    assert not marker.exists() and not out.exists()


def test_checkpoint_holds_only_tensors_and_json(trained):
    name, module, make, path = trained
    state = torch.load(path, map_location="cpu", weights_only=True)
    assert all(isinstance(t, torch.Tensor) for part in state.values() for t in part.values())
    meta = json.loads((path.parent / META_FILE).read_text())
    assert meta["config"]["resolution"] == RES and meta["weights_sha256"] == file_hash(path)
