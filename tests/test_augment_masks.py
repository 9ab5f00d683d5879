import numpy as np
import pytest
import torch
from scipy import ndimage

from augment.masks import DeformConfig, classical_pairs, deform_masks, drop_fragments, mask_problem
from augment.pairs import PairError
from augment_helpers import ellipse_masks, images_for

RES = 64


def test_deformed_masks_are_binary_plausible_and_unshredded():
    src = ellipse_masks(3, RES, seed=1)
    cfg = DeformConfig()
    out, source, dropped = deform_masks(src, 12, config=cfg, seed=0)
    assert out.shape == (12, 1, RES, RES)
    assert list(source) == [0, 1, 2] * 4 and list(dropped) == [0, 0, 0]
    assert set(torch.unique(out).tolist()) == {0.0, 1.0}
    for k, s in enumerate(source):
        ratio = out[k].sum().item() / src[s].sum()
        assert cfg.min_area_ratio <= ratio <= cfg.max_area_ratio
        assert ndimage.label(out[k, 0].numpy())[1] == 1
    assert not torch.equal(out[0], torch.from_numpy(src[0]))  # actually deformed


def test_deformation_is_seeded():
    src = ellipse_masks(2, RES)
    a, _, _ = deform_masks(src, 4, seed=3)
    b, _, _ = deform_masks(src, 4, seed=3)
    c, _, _ = deform_masks(src, 4, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_classical_pairs_move_image_and_mask_together():
    masks = ellipse_masks(2, RES, seed=2)
    images = masks * 3.0 + 1.0  # image is a function of the mask, so they must stay aligned
    out_i, out_m, source, _ = classical_pairs(images, masks, 6, seed=0)
    assert out_i.shape == out_m.shape == (6, 1, RES, RES)
    agreement = ((out_i > 2.5).float() == out_m).float().mean()
    assert agreement > 0.98
    # the outside of the field of view is filled with the image minimum, not 0
    assert out_i.min() >= 1.0 - 1e-4


def test_mask_problem_flags_empty_area_and_fragments():
    cfg = DeformConfig()
    src = np.zeros((RES, RES), np.uint8)
    src[20:40, 20:40] = 1
    assert mask_problem(np.zeros_like(src), src, cfg) == "empty"
    small = np.zeros_like(src)
    small[20:25, 20:25] = 1
    assert "area ratio" in mask_problem(small, src, cfg)
    shredded = src.copy()
    shredded[50:52, 50:52] = 1
    assert "shredded" in mask_problem(shredded, src, cfg)
    assert mask_problem(src, src, cfg) is None


def test_impossible_deformation_raises():
    cfg = DeformConfig(min_area_ratio=0.999, max_area_ratio=1.001, max_tries=2)
    with pytest.raises(PairError, match="could not deform source mask 0"):
        deform_masks(ellipse_masks(1, RES), 2, config=cfg, seed=0)


@pytest.mark.parametrize("bad, match", [
    ("empty", "empty"), ("full", "all foreground"), ("nonbinary", "binary"), ("zero", "0 masks")])
def test_bad_masks_raise(bad, match):
    masks = ellipse_masks(2, RES)
    if bad == "empty":
        masks[1] = 0
    elif bad == "full":
        masks[0] = 1
    elif bad == "nonbinary":
        masks[0, 0, 0, 0] = 0.5
    elif bad == "zero":
        masks = masks[:0]
    with pytest.raises(PairError, match=match):
        deform_masks(masks, 3)


def test_classical_rejects_mismatched_and_nan():
    masks = ellipse_masks(2, RES)
    images = images_for(masks)
    with pytest.raises(PairError, match="differ in shape"):
        classical_pairs(images[:, :, :32, :32], masks, 2)
    images[0, 0, 3, 3] = np.nan
    with pytest.raises(PairError, match="NaN"):
        classical_pairs(images, masks, 2)


# ---- issue 9 item 10: a real support with stray pixels ------------------------------------------------

def chaos_fold3_left_kidney() -> np.ndarray:
    """A replica `(1, 1, 128, 128)` of CHAOS volume 36's third EP1 left-kidney slice at 128 px.

    The real mask is one 326-px kidney (rows 32-50, columns 75-94) plus two 1-px specks at (40, 30) and
    (44, 32), 4-connected components; this hand-built copy has the same layout and roughly the same sizes.
    """
    yy, xx = np.mgrid[:128, :128]
    mask = (((yy - 41.5) / 10) ** 2 + ((xx - 85) / 10.5) ** 2 < 1).astype(np.float32)
    mask[40, 30] = mask[44, 32] = 1
    return mask[None, None]


def test_replica_has_the_real_supports_components():
    labels, n = ndimage.label(chaos_fold3_left_kidney()[0, 0])
    assert n == 3 and sorted(np.bincount(labels.ravel())[1:].tolist())[:2] == [1, 1]
    assert 300 <= labels.astype(bool).sum() - 2 <= 350


def test_support_with_stray_pixels_deforms_and_reports_the_dropped_fragments():
    masks = chaos_fold3_left_kidney()
    images = images_for(masks, seed=3)
    out, source, dropped = deform_masks(masks, 8, seed=0)
    assert list(dropped) == [2] and list(source) == [0] * 8
    assert all(ndimage.label(m[0].numpy())[1] == 1 for m in out)  # the specks went, the kidney stayed whole
    out_i, out_m, _, dropped_c = classical_pairs(images, masks, 8, seed=0)
    assert list(dropped_c) == [2] and out_i.shape == out_m.shape == (8, 1, 128, 128)
    # deterministic by seed
    assert torch.equal(deform_masks(masks, 8, seed=0)[0], out)
    assert torch.equal(classical_pairs(images, masks, 8, seed=0)[1], out_m)
    assert not torch.equal(deform_masks(masks, 8, seed=1)[0], out)


def test_fragments_the_source_already_has_are_not_damage():
    masks = chaos_fold3_left_kidney()
    keep_all = DeformConfig(drop_fragment_px=0)
    out, _, dropped = deform_masks(masks, 8, config=keep_all, seed=0)
    assert list(dropped) == [0] and out.shape == (8, 1, 128, 128)
    src = masks[0, 0].astype(np.uint8)
    assert mask_problem(src, src, keep_all) is None  # the source itself, specks included, is plausible
    extra = src.copy()
    extra[100, 100] = extra[110, 20] = 1  # two more specks than the source: damage
    assert "shredded: 5 components (source 3)" in mask_problem(extra, src, keep_all)


def test_drop_fragments_keeps_the_largest_component():
    mask = np.zeros((16, 16), np.uint8)
    mask[2, 2] = mask[10, 10] = 1
    same, n = drop_fragments(mask, 4)
    assert n == 1 and same.sum() == 1  # both tiny: the first largest stays, the mask never empties
    assert drop_fragments(chaos_fold3_left_kidney()[0, 0], 0)[1] == 0
    with pytest.raises(ValueError, match="drop_fragment_px must be >= 0"):
        DeformConfig(drop_fragment_px=-1)
