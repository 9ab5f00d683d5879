"""The registered source: other subjects' real slices with a registered support mask, and `relabel`, which keeps
a pair only where the segmenter's mask agrees with the registered one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from augment.config import LearnedConfig, RegisteredConfig
from augment.pairs import PairError
from augment.registered import agreement, make_set, relabel
from augment.registry import volume_source
from augment.synthesis import SyntheticSet
from segment.data.protocol import make_folds, support_pairs


def _square(top: int, size: int = 8, n: int = 16) -> torch.Tensor:
    m = torch.zeros(1, n, n)
    m[0, top:top + size, 4:4 + size] = 1
    return m


def _set(masks: list[torch.Tensor]) -> SyntheticSet:
    manifest = {"source": [{"volume": "s", "slice": k} for k in range(len(masks))],
                "pairs": [{"volume": f"v{k}", "slice": k} for k in range(len(masks))]}
    return SyntheticSet(torch.rand(len(masks), 1, 16, 16), torch.stack(masks), manifest)


def test_relabel_keeps_the_agreeing_pairs_best_first_with_the_predicted_masks():
    registered = _set([_square(0), _square(0), _square(0), _square(0)])
    predicted = torch.stack([_square(2), _square(0), _square(6), torch.zeros(1, 16, 16)])  # Dice 0.75, 1, 0.25, 0
    assert agreement(predicted, registered.masks).tolist() == pytest.approx([0.75, 1.0, 0.25, 0.0])
    out = relabel(registered, predicted, min_agreement=0.7, n=12, teacher="t")
    assert out.manifest["relabelled"]["kept"] == [1, 0] and out.manifest["relabelled"]["teacher"] == "t"
    assert torch.equal(out.images, registered.images[[1, 0]])
    assert torch.equal(out.masks, predicted[[1, 0]])              # the segmenter's masks, not the registered ones
    assert [p["volume"] for p in out.manifest["pairs"]] == ["v1", "v0"]
    assert [p["agreement"] for p in out.manifest["pairs"]] == [1.0, 0.75]
    assert len(relabel(registered, predicted, min_agreement=0.7, n=1, teacher="t")) == 1
    strict = relabel(registered, predicted, min_agreement=1.0, n=3, teacher="t")   # only pair 1 agrees fully
    assert strict.manifest["relabelled"]["kept"] == [1]
    none = relabel(registered, torch.zeros(4, 1, 16, 16), min_agreement=0.5, n=3, teacher="t")
    assert len(none) == 0 and none.images.shape == (0, 1, 16, 16)  # an empty prediction never becomes a pair


@pytest.mark.parametrize("predicted, kwargs, message", [
    (torch.zeros(3, 1, 16, 16), {}, r"^relabel: \(3, 1, 16, 16\) predicted masks for \(4, 1, 16, 16\) pairs$"),
    (torch.zeros(4, 1, 16, 16), {"min_agreement": 0.0}, r"^relabel: min_agreement must be in \(0, 1\]"),
    (torch.zeros(4, 1, 16, 16), {"n": 0}, r"and n >= 1, got 0.7 and 0$"),
])
def test_relabel_refuses_bad_input_in_one_line(predicted, kwargs, message):
    with pytest.raises(PairError, match=message):
        relabel(_set([_square(0)] * 4), predicted, **({"min_agreement": 0.7, "n": 2, "teacher": "t"} | kwargs))


def test_registered_config_refuses_an_agreement_outside_0_1():
    with pytest.raises(ValueError, match=r"min_agreement=1.5 must be in \(0, 1\]"):
        RegisteredConfig(min_agreement=1.5)


@pytest.fixture(scope="module")
def registration(phantom_data, tmp_path_factory):
    """A tiny registration model of fold 0, trained on its training volumes' images."""
    fold = make_folds(phantom_data.ids, phantom_data.spec.n_folds)[0]
    out = tmp_path_factory.mktemp("reg")
    config = LearnedConfig(resolution=32, channels=(8, 16, 16, 8), final_channels=(8,), integration_steps=2, steps=2,
                           batch_size=2, pool_size=4, candidates=2)
    volumes = {v: phantom_data.volume(v).images for v in fold.train}
    checkpoint = volume_source("learned").train(config, volumes=volumes, fold=0, query_volumes=fold.queries, out_dir=out)
    return checkpoint, fold


def _make(phantom_data, fold, checkpoint, **over):
    vol = phantom_data.volume(fold.support)
    images, masks, idx = support_pairs(vol, phantom_data.spec.class_id("liver"), "EP1")
    options = volume_source("registered").pair_options(RegisteredConfig(resolution=32, min_similarity=0.0))
    kwargs = dict(support=(torch.from_numpy(images), torch.from_numpy(masks), [(fold.support, z) for z in idx]),
                  support_volume=vol.images, support_slices=list(idx),
                  volumes={v: phantom_data.volume(v).images for v in fold.train}, labels=None, n=4, seed=0, fold=0,
                  class_name="liver", query_volumes=fold.queries) | options | over
    return make_set(checkpoint, **kwargs)


def test_registered_pairs_are_the_target_slices_own_images_with_the_warped_support_masks(phantom_data, registration):
    checkpoint, fold = registration
    syn = _make(phantom_data, fold, checkpoint)
    assert len(syn) == syn.manifest["checks"]["n_passed"] > 0     # every passing candidate, for relabel to choose
    for k, pair in enumerate(syn.manifest["pairs"]):
        assert pair["volume"] in fold.train
        target = torch.from_numpy(phantom_data.volume(pair["volume"]).images[pair["slice"]])
        assert torch.equal(syn.images[k, 0], target)              # real anatomy, real texture
    assert set(syn.masks.unique().tolist()) <= {0.0, 1.0}
    assert syn.manifest["unlabelled_volumes"] == sorted(fold.train)


def test_registered_source_reads_no_label_and_refuses_a_model_at_another_resolution(phantom_data, registration,
                                                                                    tmp_path):
    checkpoint, fold = registration
    with pytest.raises(PairError, match="reads no label"):
        _make(phantom_data, fold, checkpoint, labels={v: None for v in fold.train})
    small = {v: np.random.default_rng(0).random((6, 16, 16)).astype(np.float32) for v in fold.train}
    other = volume_source("learned").train(
        LearnedConfig(resolution=16, channels=(8, 16, 16, 8), final_channels=(8,), integration_steps=2, steps=1,
                      batch_size=2, pool_size=2, candidates=1), volumes=small, fold=0, query_volumes=fold.queries,
        out_dir=tmp_path / "m")
    with pytest.raises(PairError, match=r"^registered pairs, fold 0, class liver: .*trained at 16") as err:
        _make(phantom_data, fold, other)
    assert "\n" not in str(err.value)
