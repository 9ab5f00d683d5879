"""The propagated source (issue 12): support-volume slices next to the supports, masks carried by optical flow."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from augment import propagated
from augment.config import PropagatedConfig
from augment.manifest import LeakageError, SliceRef
from augment.pairs import PairError
from augment.propagated import propagate, propagated_pairs
from augment.registry import VOLUME_SOURCES
from augment.warped_pairs import PairChecks
from segment.data.phantom import phantom_volume
from segment.data.protocol import ep1_support_indices
from files import benchmark_module

RES, DEPTH, LIVER = 48, 16, 1
CHECKS = PairChecks(max_folded_share=PropagatedConfig().max_folded_share)


@pytest.fixture(scope="module")
def volume():
    image, labels = phantom_volume(0, 1, size=RES, depth=DEPTH)
    return ((image - image.mean()) / image.std()).astype(np.float32), labels


def _supports(image, labels):
    idx = ep1_support_indices(labels, LIVER, 3)
    masks = torch.from_numpy((labels[idx] == LIVER)[:, None].astype(np.float32))
    return torch.from_numpy(image[idx][:, None]), masks, idx


def _set_kwargs(volume, volumes: dict, **config) -> dict:
    """`make_set`'s keywords but `labels` and `query_volumes`: 6 liver pairs of support volume "7", 3 supports."""
    image, labels = volume
    sup_i, sup_m, idx = _supports(image, labels)
    return dict(support=(sup_i, sup_m, [SliceRef("7", z) for z in idx]), support_volume=image, support_slices=idx,
                volumes=volumes, n=6, seed=0, fold=0, class_name="liver",
                **VOLUME_SOURCES["propagated"].pair_options(PropagatedConfig(resolution=RES, **config)))


def _dice(a, b) -> float:
    a, b = np.asarray(a) > 0.5, np.asarray(b) > 0
    return float(2 * (a & b).sum() / (a.sum() + b.sum()))


def test_a_known_shift_is_carried_onto_the_shifted_image():
    rng = np.random.default_rng(0)
    moving = np.kron(rng.standard_normal((8, 8)), np.ones((6, 6))).astype(np.float32)  # (48, 48) blocks
    mask = np.zeros((RES, RES), np.float32)
    mask[12:30, 18:36] = 1
    fixed, truth = np.roll(moving, (3, -2), (0, 1)), np.roll(mask, (3, -2), (0, 1))
    out, folded = propagate(mask, moving, fixed)
    assert _dice(out, truth) > 0.9 > _dice(mask, truth)
    assert folded == 0.0


def test_pairs_are_real_support_volume_slices_with_masks_closer_to_the_truth_than_a_copy(volume):
    image, labels = volume
    sup_i, sup_m, idx = _supports(image, labels)
    images, masks, info = propagated_pairs(sup_i, sup_m, image, idx, 12, seed=0, offsets=(1, 2), checks=CHECKS)
    assert images.shape == masks.shape == (12, 1, RES, RES)
    gains = []
    for k, p in enumerate(info["pairs"]):
        assert p["slice"] == idx[p["support"]] + p["offset"] and abs(p["offset"]) in (1, 2)
        assert torch.equal(images[k, 0], torch.from_numpy(image[p["slice"]]))     # the real slice, untouched
        truth = labels[p["slice"]] == LIVER
        gains.append(_dice(masks[k, 0], truth) - _dice(sup_m[p["support"], 0], truth))
    assert np.mean(gains) > 0
    assert {p["support"] for p in info["pairs"]} == {0, 1, 2}
    again = propagated_pairs(sup_i, sup_m, image, idx, 12, seed=0, offsets=(1, 2), checks=CHECKS)
    assert torch.equal(again[1], masks)


def test_nearest_slices_come_first_and_a_support_slice_is_never_a_target(volume):
    image, labels = volume
    sup_i, sup_m, idx = _supports(image, labels)
    _, _, info = propagated_pairs(sup_i, sup_m, image, idx, 3, seed=0, offsets=(1, 2), checks=CHECKS)
    assert all(abs(p["offset"]) == 1 for p in info["pairs"])
    adjacent = [idx[1], idx[1] + 1]                      # two supports one slice apart, mid-organ
    pair = (torch.from_numpy(image[adjacent][:, None]),
            torch.from_numpy((labels[adjacent] == LIVER)[:, None].astype(np.float32)))
    _, _, info = propagated_pairs(*pair, image, adjacent, 4, seed=0, offsets=(1, 2), checks=CHECKS)
    targets = {(c["support"], c["slice"]) for c in info["candidates"]}
    assert targets == {(0, adjacent[0] - 1), (0, adjacent[0] - 2), (1, adjacent[1] + 1), (1, adjacent[1] + 2)}


def test_a_mask_that_vanishes_fails_in_one_line_naming_each_pair(volume):
    image, _ = volume
    mask = torch.zeros(1, 1, RES, RES)
    mask[0, 0, 0, 0] = 1                                  # one pixel at the corner: gone after one step
    with pytest.raises(PairError) as err:
        propagated_pairs(torch.from_numpy(image[5:6][:, None]), mask, image, [5], 2, seed=0, offsets=(1,),
                         checks=CHECKS)
    assert "\n" not in str(err.value)
    assert "support 0 -> slice 4" in str(err.value) and "support 0 -> slice 6" in str(err.value)


def test_another_resolution_is_refused_naming_it(volume):
    image, labels = volume
    sup_i, sup_m, idx = _supports(image, labels)
    with pytest.raises(PairError, match=r"support_volume must be \(Z, 48, 48\), got \(16, 24, 24\)"):
        propagated_pairs(sup_i, sup_m, image[:, ::2, ::2], idx, 4, seed=0, offsets=(1,), checks=CHECKS)


def test_make_set_records_the_support_volume_slices_and_refuses_labels_and_a_query_support(volume):
    image, labels = volume
    kwargs = _set_kwargs(volume, {"8": image})
    syn = propagated.make_set(None, labels=None, query_volumes=("9",), **kwargs)
    training = syn.manifest["training"]
    assert {r["volume"] for r in training["derived"]} == {"7"} and training["pretrain"] == []
    assert sorted(r["slice"] for r in training["derived"]) == sorted({p["slice"] for p in syn.manifest["pairs"]})
    with pytest.raises(PairError, match="reads no label"):
        propagated.make_set(None, labels={"8": labels}, query_volumes=("9",), **kwargs)
    with pytest.raises(LeakageError, match=r"query volumes \['7'\]"):
        propagated.make_set(None, labels=None, query_volumes=("7",), **kwargs)


@pytest.mark.parametrize("offsets", [(), (0, 1), (1, 1)])
def test_bad_offsets_are_refused(offsets):
    with pytest.raises(ValueError, match="offsets"):
        PropagatedConfig(offsets=offsets)


def test_benchmark_measures_label_accuracy_per_offset_on_training_volumes_only(tmp_path):
    bench = benchmark_module("augment_propagated")
    result = bench.main(["--phantom", "--out", str(tmp_path), "--max-offset", "2"])
    assert set(result["all"]) == {1, 2}
    near, far = result["all"][1], result["all"][2]
    assert near["propagated_all"] > near["copied_all"]           # the flow carries the mask better than a copy
    assert near["propagated_all"] > far["propagated_all"]        # and accuracy falls with distance
    assert (tmp_path / "augment_propagated.md").read_text().count("| all |") == 2
    assert "min_similarity" not in result["checks"]              # only the checks the source applies are recorded


def test_appearance_gives_each_pair_another_volumes_contrast_and_keeps_its_mask(volume):
    image, _ = volume
    other = (np.exp(image) / 3).astype(np.float32)               # another subject: a skewed intensity histogram
    kwargs = _set_kwargs(volume, {"7": image, "8": other})
    assert "appearance" not in kwargs                             # at its default it stays out of the stage key
    plain = propagated.make_set(None, labels=None, query_volumes=("9",), **kwargs)
    styled = propagated.make_set(None, labels=None, query_volumes=("9",),
                                 **_set_kwargs(volume, {"7": image, "8": other}, appearance=True))
    assert torch.equal(styled.masks, plain.masks)
    for k, p in enumerate(styled.manifest["pairs"]):
        assert p["appearance_donor"] == ["8", p["slice"]]         # never the support volume; the same height
        levels = np.linspace(0.1, 0.9, 9)
        got = np.quantile(styled.images[k, 0].numpy(), levels)
        assert np.allclose(got, np.quantile(other[p["slice"]], levels), atol=0.05)
        assert not np.allclose(got, np.quantile(plain.images[k, 0].numpy(), levels), atol=0.05)
    derived = {(r["volume"], r["slice"]) for r in styled.manifest["training"]["derived"]}
    assert {("8", p["slice"]) for p in styled.manifest["pairs"]} <= derived
    assert styled.manifest["appearance"] is True and plain.manifest["appearance"] is False


def test_appearance_without_another_training_volume_fails_naming_the_support_volume(volume):
    image, _ = volume
    with pytest.raises(PairError, match="fold 0, class liver: appearance needs a training volume other than the "
                                        "support volume 7"):
        propagated.make_set(None, labels=None, query_volumes=("9",),
                            **_set_kwargs(volume, {"7": image}, appearance=True))
