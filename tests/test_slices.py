"""Slice preparation and its content-addressed cache."""

from __future__ import annotations

import numpy as np

from segment.data.phantom import phantom_volume
from segment.data.slices import prepare
from segment.data.volumes import load_spec


def test_slices_are_normalised_resized_and_labelled(phantom_dir, tmp_path):
    spec = load_spec(phantom_dir / "dataset.toml")
    data = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path)
    assert data.ids == ("1", "2", "3", "4", "5", "6")
    v = data.volume("1")
    assert v.images.shape == (16, 32, 32) and v.images.dtype == np.float32
    assert v.labels.shape == (16, 32, 32) and v.labels.dtype == np.uint8
    assert set(np.unique(v.labels)) <= {0, 1, 2, 3, 4}
    # The per-volume z-score is taken at full resolution; resizing keeps it close to (0, 1).
    assert abs(float(v.images.mean())) < 0.05 and abs(float(v.images.std()) - 1.0) < 0.1
    # Labels land where the phantom drew them: compare with the generator's own (Z, H, W) arrays.
    _, raw_labels = phantom_volume(0, 1, size=48, depth=16)
    assert np.array_equal(v.slices_with(1), np.flatnonzero((raw_labels == 1).any(axis=(1, 2))))


def test_second_prepare_reads_the_cache(phantom_dir, tmp_path):
    spec = load_spec(phantom_dir / "dataset.toml")
    first = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path)
    stamp = (first.path / "meta.json").stat().st_mtime_ns
    second = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path)
    assert second.path == first.path and (second.path / "meta.json").stat().st_mtime_ns == stamp
    assert all(np.array_equal(a.images, b.images) for a, b in zip(first.volumes, second.volumes))


def test_cache_key_follows_resolution_spec_and_content(phantom_copy, tmp_path):
    spec = load_spec(phantom_copy / "dataset.toml")
    base = prepare(spec, phantom_copy, resolution=32, cache_dir=tmp_path)
    other_res = prepare(spec, phantom_copy, resolution=40, cache_dir=tmp_path)
    assert other_res.key != base.key and other_res.volumes[0].images.shape[1:] == (40, 40)
    (phantom_copy / "dataset.toml").write_text((phantom_copy / "dataset.toml").read_text()
                                               .replace("n_folds = 2", "n_folds = 3"))
    renamed = prepare(load_spec(phantom_copy / "dataset.toml"), phantom_copy, resolution=32, cache_dir=tmp_path)
    assert renamed.key != base.key and renamed.spec.n_folds == 3
    # Same file names, different bytes: a stale cache would return the old slices.
    import shutil
    shutil.copy(phantom_copy / "image_2.nii.gz", phantom_copy / "image_1.nii.gz")
    shutil.copy(phantom_copy / "label_2.nii.gz", phantom_copy / "label_1.nii.gz")
    changed = prepare(spec, phantom_copy, resolution=32, cache_dir=tmp_path)
    assert changed.key != base.key
    assert np.array_equal(changed.volume("1").labels, base.volume("2").labels)


def test_window_zscore_is_global(tmp_path):
    import nibabel as nib
    spec = load_spec("abd_ct")
    rng = np.random.default_rng(0)
    for i, offset in ((1, -500.0), (2, 0.0)):
        image = rng.normal(offset, 200.0, size=(16, 16, 6)).astype(np.float32)
        label = np.zeros((16, 16, 6), dtype=np.uint8)
        label[4:8, 4:8, 2:4] = 6
        label[10:12, 10:12, 2:4], label[10:12, 2:4, 2:4], label[2:4, 10:12, 2:4] = 1, 2, 3
        nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / f"image_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, np.eye(4)), tmp_path / f"label_{i}.nii.gz")
    data = prepare(spec, tmp_path, resolution=16, cache_dir=tmp_path / "cache", min_volumes=2)
    a, b = data.volume("1").images, data.volume("2").images
    # One z-score over both volumes: the darker volume stays darker, and the pooled stats are (0, 1).
    assert a.mean() < b.mean() - 0.5
    pooled = np.concatenate([a.ravel(), b.ravel()])
    assert abs(pooled.mean()) < 0.05 and abs(pooled.std() - 1.0) < 0.1
    assert data.volume("1").labels.max() == 4  # raw 6 (liver) is class id 4


def test_native_labels_are_kept_beside_the_working_slices_and_cached(phantom_dir, tmp_path):
    spec = load_spec(phantom_dir / "dataset.toml")
    first = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path)
    _, raw_labels = phantom_volume(0, 1, size=48, depth=16)
    v = first.volume("1")
    assert v.native_labels.shape == (16, 48, 48) and v.native_labels.dtype == np.uint8
    assert np.array_equal(v.native_labels, raw_labels)  # the labels as loaded, not resized
    with np.load(first.path / "volume_1.npz") as saved:
        assert np.array_equal(saved["native_labels"], raw_labels)
    again = prepare(spec, phantom_dir, resolution=32, cache_dir=tmp_path)  # read back from the cache
    assert all(np.array_equal(a.native_labels, b.native_labels) for a, b in zip(first.volumes, again.volumes))


def test_slice_cache_version_is_in_the_key(phantom_dir, monkeypatch):
    # A folder written before native labels were kept (version 1) must never be read as a new one.
    from segment.data import slices
    spec = load_spec(phantom_dir / "dataset.toml")
    ids = ["1", "2"]
    now = slices.cache_key(spec, phantom_dir, ids, 32)
    monkeypatch.setattr(slices, "SLICES_VERSION", "1")
    assert slices.cache_key(spec, phantom_dir, ids, 32) != now


def test_native_labels_must_have_one_slice_per_working_slice():
    import pytest

    from segment.data.slices import Volume
    from segment.data.volumes import DataError
    with pytest.raises(DataError, match=r"volume '7': 3 native label slices but 2 working slices"):
        Volume("7", np.zeros((2, 4, 4), np.float32), np.zeros((2, 4, 4), np.uint8), np.zeros((3, 8, 8), np.uint8))
