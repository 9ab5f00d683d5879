"""Episodes and superpixels on the phantom (32 px): shapes, seeding, Settings, external pairs, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segment.episodes import Augmenter, AugmentParams, PairSampler, SuperpixelSampler, SupervisedSampler, collate
from segment.pooling import SegmentInputError
from segment.data.protocol import make_folds
from segment.data.superpixels import SuperpixelParams, superpixels
from segment.train import SegmenterConfig, training_sampler




@pytest.fixture(scope="module")
def fold(phantom_data):
    return make_folds(sorted(phantom_data.ids, key=int), phantom_data.spec.n_folds)[0]


def config(**kw) -> SegmenterConfig:
    return SegmenterConfig(width=4, depth=2, dilated_blocks=1, embed_dim=8, resolution=32, **kw)


def test_superpixels_are_cached_and_keyed_by_parameters(phantom_data, tmp_path):
    first = superpixels(phantom_data, cache_dir=tmp_path)
    folders = list((tmp_path / "superpixels").iterdir())
    assert len(folders) == 1 and (folders[0] / "meta.json").is_file()
    v = phantom_data.volumes[0]
    seg = first[v.id]
    assert seg.shape == v.images.shape and seg.dtype == np.int32
    assert seg.max() >= 2  # several segments inside the body
    assert (seg[v.images <= v.images.min() + 1e-6] == 0).mean() > 0.5  # air is mostly label 0
    again = superpixels(phantom_data, cache_dir=tmp_path)
    assert all(np.array_equal(first[k], again[k]) for k in first)
    superpixels(phantom_data, cache_dir=tmp_path, params=SuperpixelParams(scale=20.0))
    assert len(list((tmp_path / "superpixels").iterdir())) == 2  # new parameters, new folder


def test_superpixel_episode_is_two_views_of_one_segment(phantom_data, tmp_path):
    vids = phantom_data.ids[:2]
    segs = superpixels(phantom_data, cache_dir=tmp_path, volume_ids=vids)
    images = {v: phantom_data.volume(v).images for v in vids}
    sampler = SuperpixelSampler(images, segs, augment=Augmenter(AugmentParams()), min_pixels=8, n_supports=2)
    ep = sampler.sample(np.random.default_rng(0))
    assert ep.support_images.shape == (2, 1, 32, 32) and ep.query_masks.shape == (1, 1, 32, 32)
    assert ep.source == "superpixel" and ep.volume_ids[0] in vids
    for m in (ep.support_masks, ep.query_masks):
        assert set(m.unique().tolist()) == {0.0, 1.0}
    again = sampler.sample(np.random.default_rng(0))
    assert torch.equal(ep.query_images, again.query_images)  # a pure function of the generator
    other = sampler.sample(np.random.default_rng(1))
    assert not torch.equal(ep.query_images, other.query_images)


def test_supervised_episodes_never_use_a_test_class(phantom_data, fold):
    sampler = training_sampler(config(mix_superpixel=0.0, mix_supervised=1.0), phantom_data, fold,
                               test_class_ids=(1,), setting=1)
    sup = sampler.samplers[0]
    assert isinstance(sup, SupervisedSampler) and 1 not in sup.class_ids
    rng = np.random.default_rng(0)
    for _ in range(12):
        ep = sampler.sample(rng)
        assert ep.class_id in (2, 3, 4) and set(ep.volume_ids) <= set(fold.train)
        assert len(set(ep.volume_ids)) == 2  # support and query from different volumes
    for vid, labels in sup.labels.items():
        assert not (labels == 1).any()  # Setting 1: the test class is relabelled background


def test_setting_2_drops_every_slice_of_the_test_group(phantom_data, fold):
    sampler = training_sampler(config(mix_superpixel=1.0), phantom_data, fold, test_class_ids=(1,), setting=2)
    (spx,) = sampler.samplers
    assert spx.slices
    for vid, z, _ in spx.slices:
        assert not np.isin(phantom_data.volume(vid).labels[z], (1, 4)).any()  # OR rule: no liver, no spleen
    # on the phantom the kidneys always share slices with liver or spleen: nothing is left to supervise
    with pytest.raises(SegmentInputError, match=r"no training class among \[2, 3\]"):
        training_sampler(config(mix_supervised=1.0), phantom_data, fold, test_class_ids=(1,), setting=2)


def test_external_pairs_are_mixed_in(phantom_data, fold):
    images = torch.randn(3, 1, 32, 32)
    masks = torch.zeros(3, 1, 32, 32)
    masks[:, :, 10:20, 10:20] = 1
    sampler = training_sampler(config(mix_superpixel=1.0, mix_pairs=1.0), phantom_data, fold,
                               test_class_ids=(1, 2, 3, 4), setting=1, extra_pairs=(images, masks))
    assert sampler.names == ("superpixel", "pairs")
    rng = np.random.default_rng(0)
    sources = [sampler.sample(rng).source for _ in range(30)]
    assert 5 < sources.count("pairs") < 25
    batch = collate([sampler.sample(rng) for _ in range(4)])
    assert [tuple(t.shape) for t in batch] == [(4, 1, 1, 32, 32)] * 4


@pytest.mark.parametrize("images, masks, message", [
    (torch.randn(0, 1, 32, 32), torch.zeros(0, 1, 32, 32), "N >= 1"),
    (torch.randn(2, 1, 32, 32), torch.zeros(2, 1, 16, 16), "masks have shape"),
    (torch.randn(2, 1, 32, 32), torch.zeros(2, 1, 32, 32), "empty or all foreground"),
    (torch.randn(2, 1, 32, 32), torch.full((2, 1, 32, 32), 0.5), "must be binary"),
])
def test_bad_external_pairs_are_refused(images, masks, message):
    with pytest.raises(SegmentInputError, match=message):
        PairSampler(images, masks, augment=Augmenter(None))


def test_augmenter_is_seeded_and_keeps_masks_binary():
    image = np.random.default_rng(0).normal(size=(32, 32)).astype(np.float32)
    mask = np.zeros((32, 32), dtype=np.float32)
    mask[8:24, 8:24] = 1
    aug = Augmenter(AugmentParams())
    a = aug(image, mask, np.random.default_rng(7))
    b = aug(image, mask, np.random.default_rng(7))
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    assert set(np.unique(a[1]).tolist()) <= {0.0, 1.0}
    assert not np.array_equal(a[0], image)
