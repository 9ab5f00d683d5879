"""Episodes and superpixels on the phantom (32 px): shapes, seeding, Settings, external pairs, the cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from segment.episodes import (Augmenter, AugmentParams, PairSampler, SuperpixelSampler, SupervisedSampler, collate,
                              linked_mask)
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
    # on the phantom the kidneys always share slices with liver or spleen: nothing is left to supervise, so
    # the superpixel episodes train alone (and say so); without them there is nothing to train on
    with pytest.warns(UserWarning, match=r"no training class among \[2, 3\].*training without supervised episodes"):
        mixed = training_sampler(config(mix_supervised=1.0), phantom_data, fold, test_class_ids=(1,), setting=2)
    assert mixed.names == ("superpixel",)
    with pytest.raises(SegmentInputError, match=r"no training class among \[2, 3\]"):
        training_sampler(config(mix_superpixel=0.0, mix_supervised=1.0), phantom_data, fold, test_class_ids=(1,),
                         setting=2)


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


def test_linked_mask_takes_the_superpixels_mostly_inside_the_support_mask():
    segments = np.array([[1, 1, 2, 2],
                         [1, 1, 2, 2],
                         [3, 3, 0, 0],
                         [3, 3, 0, 0]])
    mask = np.zeros((4, 4), dtype=bool)
    mask[:2, :3] = True  # all of segment 1, half of segment 2
    mask[2:, 2:] = True  # all of label 0 (outside the body): never linked
    linked = linked_mask(segments, mask)
    assert np.array_equal(linked, segments == 1)  # 2 is only half inside (not a majority), 3 not at all


def _stack(slices: list[np.ndarray]) -> np.ndarray:
    return np.stack(slices).astype(np.int32)  # (Z, H, W)


def test_neighbour_episodes_take_the_query_from_a_linked_slice():
    square = np.zeros((16, 16), dtype=np.int32)
    square[4:12, 4:12] = 1
    shifted = np.zeros((16, 16), dtype=np.int32)
    shifted[5:13, 4:12] = 1  # the same structure one row lower on the next slice
    images = {"a": np.stack([np.full((16, 16), float(z)) for z in range(2)]).astype(np.float32)}
    sampler = SuperpixelSampler(images, {"a": _stack([square, shifted])}, augment=Augmenter(None), min_pixels=4,
                                span=1)
    rng = np.random.default_rng(0)
    episodes = [sampler.sample(rng) for _ in range(40)]
    moved = [e for e in episodes if e.query_images[0, 0, 0, 0] != e.support_images[0, 0, 0, 0]]
    assert 5 < len(moved) < 35  # d = +-1 or 0, and d = -1 off the first slice falls back
    for e in moved:  # the query's mask is its own slice's superpixel, not a copy of the support's
        z = int(e.query_images[0, 0, 0, 0])
        assert np.array_equal(e.query_masks[0, 0].numpy(), [square, shifted][z] == 1)
    same = SuperpixelSampler(images, {"a": _stack([square, shifted])}, augment=Augmenter(None), min_pixels=4)
    assert all(torch.equal(e.query_images, e.support_images) for e in (same.sample(rng) for _ in range(10)))


def test_neighbour_episodes_fall_back_to_the_support_slice_when_the_link_is_weak():
    left = np.zeros((16, 16), dtype=np.int32)
    left[4:12, 0:6] = 1
    right = np.zeros((16, 16), dtype=np.int32)
    right[4:12, 10:16] = 1  # no overlap with the support's superpixel: no link
    images = {"a": np.stack([np.full((16, 16), float(z)) for z in range(2)]).astype(np.float32)}
    sampler = SuperpixelSampler(images, {"a": _stack([left, right])}, augment=Augmenter(None), min_pixels=4, span=1)
    rng = np.random.default_rng(0)
    for _ in range(20):
        e = sampler.sample(rng)
        assert torch.equal(e.query_images, e.support_images) and torch.equal(e.query_masks, e.support_masks)
    with pytest.raises(SegmentInputError, match="span must be >= 0 slices, got -1"):
        SuperpixelSampler(images, {"a": _stack([left, right])}, augment=Augmenter(None), span=-1)


@pytest.mark.parametrize("key, value, message", [
    ("neighbour_span", -1, "neighbour_span must be >= 0, got -1"),
    ("neighbour_min_iou", 1.5, r"neighbour_min_iou must lie in \[0, 1\], got 1.5"),
])
def test_neighbour_config_values_are_checked(key, value, message):
    with pytest.raises(ValueError, match=message):
        SegmenterConfig(**{key: value})


def test_training_sampler_passes_the_neighbour_span(phantom_data, fold):
    sampler = training_sampler(config(neighbour_span=2), phantom_data, fold, test_class_ids=(1,), setting=1)
    (spx,) = sampler.samplers
    assert spx.span == 2 and spx.min_iou == 0.3
