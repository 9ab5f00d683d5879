"""Dataset specs, NIfTI loading and the bad inputs the foundation must refuse."""

from __future__ import annotations

import nibabel as nib
import numpy as np
import pytest

from segment.data.slices import prepare
from segment.data.volumes import DataError, builtin_specs, load_raw_volume, load_spec


def _cache_is_empty(cache) -> bool:
    return not cache.exists() or not any(p for p in cache.rglob("*") if p.is_file())


def test_builtin_specs_hold_the_reference_classes():
    assert set(builtin_specs()) >= {"abd_mri", "abd_ct", "card_mri"}
    mri = load_spec("abd_mri")
    assert mri.classes == ("liver", "right_kidney", "left_kidney", "spleen")
    assert mri.group_of("spleen") == ("liver", "spleen")
    ct = load_spec("abd_ct")
    assert ct.classes == ("spleen", "right_kidney", "left_kidney", "liver")  # raw 1, 2, 3, 6
    assert ct.normalisation == "window_zscore" and ct.window == (-125.0, 275.0)
    card = load_spec("card_mri")
    assert card.class_id("lv_myocardium") == 1 and card.class_id("rv") == 3


def test_raw_label_values_are_remapped(tmp_path):
    image = np.random.default_rng(0).normal(size=(8, 8, 4)).astype(np.float32)
    raw = np.zeros((8, 8, 4), dtype=np.int16)
    raw[1:3, 1:3, 0], raw[4:6, 4:6, 1], raw[6:8, 0:2, 2] = 200, 500, 600
    nib.save(nib.Nifti1Image(image, np.eye(4)), tmp_path / "image_1.nii.gz")
    nib.save(nib.Nifti1Image(raw, np.eye(4)), tmp_path / "label_1.nii.gz")
    _, labels = load_raw_volume(load_spec("card_mri"), tmp_path, "1")
    assert labels.shape == (4, 8, 8)  # (Z, H, W)
    assert sorted(np.unique(labels).tolist()) == [0, 1, 2, 3]
    assert (labels[0] == 1).sum() == 4 and (labels[1] == 2).sum() == 4 and (labels[2] == 3).sum() == 4


def test_user_spec_toml(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nn_folds = 3\n[labels]\n7 = "tumour"\n')
    spec = load_spec(path)
    assert spec.classes == ("tumour",) and spec.n_folds == 3 and spec.class_id("tumour") == 1


def test_user_spec_with_unknown_key_lists_valid_keys(tmp_path):
    path = tmp_path / "mine.toml"
    path.write_text('name = "mine"\nfolds = 3\n[labels]\n7 = "tumour"\n')
    with pytest.raises(DataError, match=r"unknown key\(s\) \['folds'\].*valid keys"):
        load_spec(path)


def test_unknown_builtin_spec_lists_choices():
    with pytest.raises(DataError, match="unknown dataset spec 'nope'.*abd_mri"):
        load_spec("nope")


def _save(path, array):
    nib.save(nib.Nifti1Image(array, np.eye(4)), path)


def _damage(kind: str, data):
    """Damage volume 3 of a phantom copy in one of the ways the issue names."""
    image = np.asarray(nib.load(data / "image_3.nii.gz").dataobj)
    if kind == "missing label":
        (data / "label_3.nii.gz").unlink()
    elif kind == "shape mismatch":
        _save(data / "label_3.nii.gz", np.zeros((10, 10, 5), dtype=np.uint8))
    elif kind == "unknown label":
        label = np.asarray(nib.load(data / "label_3.nii.gz").dataobj).copy()
        label[0, 0, 0] = 9
        _save(data / "label_3.nii.gz", label)
    elif kind == "nan":
        image = image.copy()
        image[2, 2, 2] = np.nan
        _save(data / "image_3.nii.gz", image)
    elif kind == "constant":
        _save(data / "image_3.nii.gz", np.full(image.shape, 5.0, dtype=np.float32))
    elif kind == "corrupt":
        (data / "image_3.nii.gz").write_bytes(b"\x1f\x8b\x08\x00 this is not a volume")


@pytest.mark.parametrize("kind, message", [
    ("missing label", r"label_3\.nii\.gz: file is missing"),
    ("shape mismatch", r"label_3\.nii\.gz: shape \(5, 10, 10\)|label_3\.nii\.gz: shape .* does not match"),
    ("unknown label", r"label_3\.nii\.gz: label value\(s\) \[9\] are not in spec 'phantom'"),
    ("nan", r"image_3\.nii\.gz: contains NaN"),
    ("constant", r"image_3\.nii\.gz: intensity is constant"),
    ("corrupt", r"image_3\.nii\.gz: cannot be read as NIfTI"),
])
def test_bad_volume_names_file_and_problem_and_writes_nothing(phantom_copy, tmp_path, kind, message):
    _damage(kind, phantom_copy)
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=message):
        prepare(load_spec(phantom_copy / "dataset.toml"), phantom_copy, resolution=32, cache_dir=cache)
    assert _cache_is_empty(cache)


def test_fewer_volumes_than_folds(phantom_copy, tmp_path):
    spec_path = phantom_copy / "dataset.toml"
    spec_path.write_text(spec_path.read_text().replace("n_folds = 2", "n_folds = 7"))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"6 volume\(s\) found but spec 'phantom' has 7 folds"):
        prepare(load_spec(spec_path), phantom_copy, resolution=32, cache_dir=cache)
    assert _cache_is_empty(cache)


def test_missing_data_folder(tmp_path):
    with pytest.raises(DataError, match=r"data folder .*nowhere does not exist"):
        prepare(load_spec("abd_mri"), tmp_path / "nowhere", resolution=32, cache_dir=tmp_path / "cache")


def test_spec_class_absent_from_every_label_file(phantom_copy, tmp_path):
    spec_path = phantom_copy / "dataset.toml"
    spec_path.write_text(spec_path.read_text().replace('4 = "spleen"', '4 = "spleen"\n7 = "pancreas"'))
    cache = tmp_path / "cache"
    with pytest.raises(DataError, match=r"class\(es\) 'pancreas' \(raw value 7\) appear in no label file"):
        prepare(load_spec(spec_path), phantom_copy, resolution=32, cache_dir=cache)
    assert _cache_is_empty(cache)


@pytest.mark.parametrize("diagonal, flips", [((-1, 1, 1), (True, False)),  # LAS, as CHAOS: anterior rows last
                                             ((1, 1, 1), (True, True)),  # RAS
                                             ((-1, -1, 1), (False, False))])  # LPS (DICOM): already radiological
def test_radiological_flips_follow_the_affine(tmp_path, diagonal, flips):
    import nibabel as nib
    import numpy as np

    from segment.data.volumes import radiological_flips
    path = tmp_path / "image_1.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 2), np.float32), np.diag([*diagonal, 1.0])), path)
    assert radiological_flips(path) == flips
