import json

import pytest
import torch

from augment import ddpm, gan
from augment.manifest import LeakageError, SliceRef
from augment.synthesis import classical_set, load_set, save_grid, save_set, synthesize, validate_manifest
from augment_helpers import RES, ellipse_masks, images_for, provenance, tiny_ddpm, tiny_gan

SUPPORT_IDS = [SliceRef("2", 4), SliceRef("2", 9), SliceRef("2", 14)]


@pytest.fixture(scope="module")
def support():
    masks = ellipse_masks(3, seed=5)
    return images_for(masks, seed=5), masks


@pytest.fixture(scope="module", params=["ddpm", "gan"])
def checkpoint(request, support, tmp_path_factory):
    pool = ellipse_masks(6, seed=9)
    module, cfg = (ddpm, tiny_ddpm()) if request.param == "ddpm" else (gan, tiny_gan())
    return module.train(cfg, pretrain_pairs=(images_for(pool), pool), finetune_pairs=support,
                        provenance=provenance(6, 3), out_dir=tmp_path_factory.mktemp(request.param))


def test_synthesize_returns_pairs_with_a_complete_manifest(checkpoint, support):
    syn = synthesize(checkpoint, *support, SUPPORT_IDS, n=7, seed=3, steps=2, query_volumes=("3", "4"))
    assert syn.images.shape == syn.masks.shape == (7, 1, RES, RES)
    m = syn.manifest
    assert m["generator"] in ("ddpm", "gan") and len(m["checkpoint_sha256"]) == 64
    assert m["seed"] == 3 and m["n"] == 7 and m["fold"] == 0
    assert m["source"][0] == {"volume": "2", "slice": 4} and m["source"][4] == {"volume": "2", "slice": 9}
    assert {r["volume"] for r in m["training"]["pretrain"]} == {"1"}
    assert m["dropped_fragments"] == [0, 0, 0]  # one count per support mask
    if m["generator"] == "ddpm":
        assert m["sampler"] == "dpmsolver++" and m["steps"] == 2
    json.dumps(m)  # JSON-able


def test_set_save_load_and_grid(checkpoint, support, tmp_path):
    syn = synthesize(checkpoint, *support, SUPPORT_IDS, n=4, seed=0)
    path = save_set(syn, tmp_path / "set")
    back = load_set(path)
    assert torch.equal(back.images, syn.images) and torch.equal(back.masks, syn.masks)
    assert back.manifest == syn.manifest
    with pytest.raises(FileExistsError, match="already exists"):
        save_set(syn, tmp_path / "set")
    png = save_grid({"real": support, "synthetic": syn}, tmp_path / "grid.png", n=4)
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"


def test_manifest_is_checked_against_the_fold_queries(checkpoint, support):
    # a support slice from a query volume is leakage
    bad_ids = [SliceRef("3", 4)] + SUPPORT_IDS[1:]
    with pytest.raises(LeakageError, match=r"query volumes \['3'\]"):
        synthesize(checkpoint, *support, bad_ids, n=2, seed=0, query_volumes=("3", "4"))
    # a manifest validated against another fold's queries: the generator trained on volume "1"
    syn = synthesize(checkpoint, *support, SUPPORT_IDS, n=2, seed=0, query_volumes=("3", "4"))
    validate_manifest(syn.manifest, ("3", "4"))
    with pytest.raises(LeakageError, match=r"\['1'\]"):
        validate_manifest(syn.manifest, ("1", "5"))


def test_checkpoint_resolution_must_match_support(checkpoint):
    big = ellipse_masks(3, res=RES * 2)
    with pytest.raises(ValueError, match="trained at 32x32"):
        synthesize(checkpoint, images_for(big), big, SUPPORT_IDS, n=2, seed=0)


def test_classical_set_is_the_control_arm(support):
    syn = classical_set(*support, SUPPORT_IDS, n=5, seed=1, fold=0, class_name="liver", query_volumes=("3",))
    assert len(syn) == 5 and syn.manifest["generator"] == "classical"
    assert syn.manifest["source"][3] == {"volume": "2", "slice": 4}
    assert syn.manifest["dropped_fragments"] == [0, 0, 0]
    with pytest.raises(LeakageError):
        classical_set(*support, SUPPORT_IDS, n=5, seed=1, query_volumes=("2",))


def test_bad_support_raises_before_work(checkpoint, support, tmp_path):
    images, masks = support
    masks = masks.copy()
    masks[0] = 0
    with pytest.raises(ValueError, match="empty"):
        synthesize(checkpoint, images, masks, SUPPORT_IDS, n=2, seed=0)
    with pytest.raises(ValueError, match="support_ids lists 2 slices but there are 3"):
        synthesize(checkpoint, *support, SUPPORT_IDS[:2], n=2, seed=0)


def test_manifest_counts_fragments_dropped_from_a_support():
    masks = ellipse_masks(1, res=64, seed=1)
    masks[0, 0, 2, 2] = masks[0, 0, 60, 5] = 1  # two stray pixels, as on CHAOS fold 3's left kidney
    syn = classical_set(images_for(masks), masks, [SliceRef("36", 28)], n=3, seed=0, query_volumes=("3",))
    assert syn.manifest["dropped_fragments"] == [2] and syn.manifest["deform"]["drop_fragment_px"] == 4
