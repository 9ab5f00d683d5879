"""The protocol pinned by hand-computed cases on toy volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segment.data.protocol import (
    dice, empty_predictor, ep1_chunk_of, ep1_query_chunks, ep1_support_indices, evaluate, excluded_class_ids,
    make_folds, mask_out_classes, oracle_predictor, scored_fold, training_slice_mask,
)
from segment.data.slices import PreparedData, Volume
from segment.data.volumes import DataError, DatasetSpec, load_spec


def test_abd_mri_folds_match_the_literature():
    ids = [str(i) for i in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)]
    folds = make_folds(ids, 5)
    assert [f.queries + (f.support,) for f in folds][0] == ("1", "2", "3", "5", "8")  # positions 0..4
    assert folds[4].queries == ("36", "37", "38", "39") and folds[4].support == "1"  # 16..19 and 0
    for f in folds:
        assert len(f.train) == 15 and not set(f.train) & set(f.queries + (f.support,))


def test_a_validation_fold_scores_the_training_volumes_with_the_same_support():
    fold = make_folds([str(i) for i in range(20)], 5)[1]
    assert scored_fold(fold, "queries") == fold
    val = scored_fold(fold, "training")
    assert (val.index, val.support, val.train) == (fold.index, fold.support, fold.train)
    assert val.queries == fold.train and not set(val.queries) & set(fold.queries)
    with pytest.raises(DataError, match=r"score_on must be one of \('queries', 'training'\), got 'test'"):
        scored_fold(fold, "test")


def test_too_few_volumes_for_folds():
    with pytest.raises(DataError, match=r"1 volume\(s\) cannot form 5 folds"):
        make_folds(["1"], 5)


def test_setting_2_drops_a_slice_with_any_excluded_class():
    labels = np.zeros((4, 4, 4), dtype=np.uint8)
    labels[0, 0, 0] = 1            # liver only: dropped under the OR rule (the AND bug would keep it)
    labels[1, 0, 0], labels[1, 1, 1] = 1, 4  # liver and spleen
    labels[2, 0, 0] = 2            # right kidney: another group, kept
    spec = load_spec("abd_mri")
    excluded = excluded_class_ids(spec, "spleen", setting=2)
    assert sorted(excluded) == [1, 4]
    assert training_slice_mask(labels, excluded, setting=2).tolist() == [False, False, True, True]
    assert training_slice_mask(labels, excluded_class_ids(spec, "spleen", 1), setting=1).all()
    assert set(np.unique(mask_out_classes(labels, (4,)))) == {0, 1, 2}


def _toy_volume(span: tuple[int, int], depth: int = 20) -> np.ndarray:
    labels = np.zeros((depth, 4, 4), dtype=np.uint8)
    labels[span[0]: span[1] + 1, 1:3, 1:3] = 1
    return labels


def test_ep1_support_slices_follow_the_1_6_1_2_5_6_rule():
    labels = _toy_volume((6, 17))  # L = 12: chunks 6-9, 10-13, 14-17
    assert ep1_support_indices(labels, 1) == [6 + 2, 6 + 6, 6 + 10]  # 6 + floor(12 * (1/6, 1/2, 5/6))
    assert ep1_support_indices(labels, 1, n_chunks=1) == [12]
    chunks = ep1_query_chunks(_toy_volume((3, 11)), 1)  # L = 9: thirds of 3 slices
    assert [c.tolist() for c in chunks] == [[3, 4, 5], [6, 7, 8], [9, 10, 11]]
    with pytest.raises(DataError, match="class id 2 is absent from the support volume"):
        ep1_support_indices(labels, 2)


def _toy_data(volumes: dict[str, np.ndarray]) -> PreparedData:
    spec = DatasetSpec(name="toy", labels={1: "organ"}, n_folds=1)
    vols = tuple(Volume(vid, np.random.default_rng(int(vid)).normal(size=lb.shape).astype(np.float32), lb)
                 for vid, lb in volumes.items())
    return PreparedData(spec, 4, vols, key="toy", path=Path("."), source=Path("/toy"))


def test_ep1_pairs_each_query_chunk_with_its_support_slice():
    data = _toy_data({"1": _toy_volume((3, 11)), "2": _toy_volume((6, 17))})  # support is "2"
    support = data.volume("2")
    calls = []

    def recorder(sup_img, sup_mask, qry):
        z = next(z for z in range(len(support.images)) if torch.equal(torch.from_numpy(support.images[z]), sup_img[0, 0]))
        calls.append((z, len(qry)))
        return torch.zeros_like(qry)

    evaluate(recorder, data, make_folds(data.ids, 1), classes=["organ"], protocol="EP1")
    assert calls == [(8, 3), (12, 3), (16, 3)]
    calls.clear()
    evaluate(recorder, data, make_folds(data.ids, 1), classes=["organ"], protocol="EP2")
    assert calls == [(12, 20)]  # the middle support slice segments every query slice


def test_hand_computed_dice():
    query = np.zeros((2, 4, 4), dtype=np.uint8)
    query[0, :2, :2] = 1             # 4 voxels
    query[1, 0, 0] = query[1, 3, 3] = 1  # 2 voxels
    support = np.zeros((2, 4, 4), dtype=np.uint8)
    support[:, :2, :2] = 1
    data = _toy_data({"1": query, "2": support})

    def top_left(sup_img, sup_mask, qry):
        out = torch.zeros_like(qry)
        out[:, :, :2, :2] = 1.0      # 4 voxels a slice: TP = 4 + 1, FP = 3, FN = 1
        return out

    res = evaluate(top_left, data, make_folds(data.ids, 1), classes=["organ"], protocol="EP2")
    assert res["folds"][0]["dice"]["organ"]["1"] == pytest.approx(2 * 5 / (2 * 5 + 3 + 1))
    assert dice(np.zeros(3, bool), np.zeros(3, bool)) == 1.0


@pytest.mark.parametrize("grid", ["native", "working"])
def test_oracle_scores_one_and_empty_scores_zero(phantom_data, grid):
    # The phantom is 48 px and prepared at 32: the native grid is not the working one.
    assert phantom_data.volumes[0].native_labels.shape[1:] == (48, 48)
    folds = make_folds(phantom_data.ids, phantom_data.spec.n_folds)
    for protocol in ("EP1", "EP2"):
        oracle = evaluate(oracle_predictor(phantom_data), phantom_data, folds,
                          classes=phantom_data.spec.classes, protocol=protocol, dice_grid=grid)
        assert oracle["mean"] == 1.0 and set(oracle["per_class"]) == set(phantom_data.spec.classes)
        assert oracle["dice_grid"] == grid and oracle["postprocess"] is False
        assert all(d == 1.0 for row in oracle["folds"] for per_q in row["dice"].values() for d in per_q.values())
        empty = evaluate(empty_predictor, phantom_data, folds, classes=phantom_data.spec.classes, protocol=protocol,
                         dice_grid=grid)
        assert empty["mean"] == 0.0 and empty["mean_post"] == 0.0


def test_predictor_with_wrong_output_shape_is_refused(phantom_data):
    folds = make_folds(phantom_data.ids, phantom_data.spec.n_folds)
    with pytest.raises(ValueError, match=r"predictor returned shape \(1, 1, 3, 3\), expected .*\(Q, 1, R, R\) at "
                                         r"the working size or .*\(Q, 1, H0, W0\) at the label file's size"):
        evaluate(lambda s, m, q: torch.zeros(1, 1, 3, 3), phantom_data, folds, classes=["liver"])


def test_class_absent_from_support_volume_names_the_label_file():
    data = _toy_data({"1": _toy_volume((2, 5)), "2": np.zeros((20, 4, 4), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"label_2\.nii\.gz: class 'organ' is absent from the support volume"):
        evaluate(empty_predictor, data, make_folds(data.ids, 1), classes=["organ"])


def test_ep1_query_chunks_follow_ssl_alpnet_leftovers_to_the_last_chunk():
    # Span 0..9 (L = 10, zmax - zmin = 9): z // 3 -> 0,0,0,1,1,1,2,2,2,3 -> clipped to 2. The old
    # floor((z - q0) * 3 / L) rule gave 4, 3, 3 (leftover first).
    chunks = ep1_query_chunks(_toy_volume((0, 9)), 1)
    assert [c.tolist() for c in chunks] == [[0, 1, 2], [3, 4, 5], [6, 7, 8, 9]]
    # Span 2..12 (zmax - zmin = 10, chunk width 10/3): offsets 0-3 -> 0, 4-6 -> 1, 7-10 -> 2.
    chunks = ep1_query_chunks(_toy_volume((2, 12)), 1)
    assert [c.tolist() for c in chunks] == [[2, 3, 4, 5], [6, 7, 8], [9, 10, 11, 12]]
    assert ep1_chunk_of(7, 7, 7) == 0  # a one-slice span (SSL-ALPNet's fallback)
    for zmin, zmax in ((0, 1), (3, 7), (5, 30), (0, 44)):  # the same as SSL-ALPNet's float expression
        for z in range(zmin, zmax + 1):
            assert ep1_chunk_of(z, zmin, zmax) == min(max(int((z - zmin) // ((zmax - zmin) / 3)), 0), 2)


def _native_and_working(native: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(Z, 8, 8) native labels and their (Z, 4, 4) working labels, down-sampled as `prepare` does."""
    x = torch.from_numpy(native.astype(np.float32))[:, None]
    working = torch.nn.functional.interpolate(x, size=(4, 4), mode="nearest-exact")[:, 0].round().to(torch.uint8)
    return native, working.numpy()


def _two_grid_data(natives: dict[str, np.ndarray]) -> PreparedData:
    spec = DatasetSpec(name="toy", labels={1: "organ"}, n_folds=1)
    vols = []
    for vid, native in natives.items():
        native, working = _native_and_working(native)
        images = np.random.default_rng(int(vid)).normal(size=working.shape).astype(np.float32)
        vols.append(Volume(vid, images, working, native))
    return PreparedData(spec, 4, tuple(vols), key="toy", path=Path("."), source=Path("/toy"))


def test_class_ranges_come_from_native_labels():
    # A structure that only native pixel (0, 0) shows in the end slices: nearest-exact 8 -> 4 samples
    # pixels 1, 3, 5, 7, so the working labels lose it there.
    query = np.zeros((12, 8, 8), dtype=np.uint8)
    query[2:10, 2:6, 2:6] = 1
    query[1, 0, 0] = query[10, 0, 0] = 1  # native span 1..10, working span 2..9
    support = np.zeros((12, 8, 8), dtype=np.uint8)
    support[3:9, 2:6, 2:6] = 1
    support[0, 0, 0] = 1  # native span 0..8 (L = 9), working span 3..8
    data = _two_grid_data({"1": query, "2": support})
    assert data.volume("1").slices_with(1).tolist() == list(range(2, 10))  # what the working grid sees
    support_vol, calls = data.volume("2"), []

    def recorder(sup_img, sup_mask, qry):
        z = next(z for z in range(12) if torch.equal(torch.from_numpy(support_vol.images[z]), sup_img[0, 0]))
        zs = [z for z in range(12) for q in qry if torch.equal(torch.from_numpy(data.volume("1").images[z]), q[0])]
        calls.append((z, zs))
        return torch.zeros_like(qry)

    res = evaluate(recorder, data, make_folds(data.ids, 1), classes=["organ"], protocol="EP1")
    # support: 0 + floor(9 * (1, 3, 5) / 6) = 1, 4, 7; query span 1..10 (zmax - zmin = 9): thirds of 3, last 4
    assert calls == [(1, [1, 2, 3]), (4, [4, 5, 6]), (7, [7, 8, 9, 10])]
    assert res["folds"][0]["support_slices"]["organ"] == [1, 4, 7]


def test_working_probabilities_are_resized_bilinearly_then_thresholded():
    # Working 4 x 4 probability 1 on the top-left 2 x 2 block, bilinear (align_corners=False) to 8 x 8, by
    # hand per axis: native i samples working (i + 0.5) / 2 - 0.5 = (clamped 0), 0.25, 0.75, 1.25, 1.75, ...
    # -> values 1, 1, 1, 0.75, 0.25, 0, 0, 0. Products > 0.5: rows/cols 0..3 (0.75 x 0.75 = 0.5625), 4 x 4.
    query = np.zeros((3, 8, 8), dtype=np.uint8)
    query[:, :4, :4] = 1
    query[:, 7, 7] = 1  # one more true native voxel per slice, outside the block
    support = query.copy()
    data = _two_grid_data({"1": query, "2": support})

    def top_left(sup_img, sup_mask, qry):
        out = torch.zeros_like(qry)  # (Q, 1, 4, 4)
        out[:, :, :2, :2] = 1.0
        return out

    folds = make_folds(data.ids, 1)
    native = evaluate(top_left, data, folds, classes=["organ"], protocol="EP2")
    # native: pred 16 per slice, truth 17: Dice = 2 * 16 / (16 + 17)
    assert native["folds"][0]["dice"]["organ"]["1"] == pytest.approx(32 / 33)
    working = evaluate(top_left, data, folds, classes=["organ"], protocol="EP2", dice_grid="working")
    # working truth samples native pixels 1, 3, 5, 7: (0..1, 0..1) and (3, 3); pred 4 -> Dice 2 * 4 / (4 + 5)
    assert working["folds"][0]["dice"]["organ"]["1"] == pytest.approx(8 / 9)
    assert native["dice_grid"] == "native" and working["dice_grid"] == "working"


def test_post_processing_is_per_query_volume_and_never_trims_the_oracle():
    # A U-shaped organ: two columns (rows 0, cols 0 and 7) joined only in the last slice. EP1's first chunk
    # holds the two columns apart; a per-chunk largest component would drop one, a per-volume one keeps both.
    query = np.zeros((9, 8, 8), dtype=np.uint8)
    query[:, 0, 0] = query[:, 0, 7] = 1
    query[8, 0, :] = 1
    support = np.zeros((9, 8, 8), dtype=np.uint8)
    support[:, 2:6, 2:6] = 1
    data = _two_grid_data({"1": query, "2": support})
    folds = make_folds(data.ids, 1)
    oracle = oracle_predictor(data)
    res = evaluate(oracle, data, folds, classes=["organ"], protocol="EP1")
    assert res["mean"] == 1.0 and res["mean_post"] == 1.0

    def oracle_plus_blob(sup_img, sup_mask, qry):
        out = oracle(sup_img, sup_mask, qry)  # (Q, 1, 8, 8) native truth
        out[:, :, 6, 3] = 1.0  # a small separate blob in every slice: 9 voxels against the U's 24
        return out

    res = evaluate(oracle_plus_blob, data, folds, classes=["organ"], protocol="EP1")
    assert res["folds"][0]["dice"]["organ"]["1"] == pytest.approx(2 * 24 / (24 + 24 + 9))
    assert res["folds"][0]["dice_post"]["organ"]["1"] == 1.0 and res["mean_post"] == 1.0


def test_unknown_dice_grid_is_refused(phantom_data):
    with pytest.raises(DataError, match=r"dice_grid must be one of \('native', 'working'\), got 'coarse'"):
        evaluate(empty_predictor, phantom_data, make_folds(phantom_data.ids, 2), classes=["liver"], dice_grid="coarse")
