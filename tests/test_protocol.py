"""The protocol pinned by hand-computed cases on toy volumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from segment.protocol import (
    dice, empty_predictor, ep1_query_chunks, ep1_support_indices, evaluate, excluded_class_ids, make_folds,
    mask_out_classes, oracle_predictor, training_slice_mask,
)
from segment.slices import PreparedData, Volume
from segment.volumes import DataError, DatasetSpec, load_spec


def test_abd_mri_folds_match_the_literature():
    ids = [str(i) for i in (1, 2, 3, 5, 8, 10, 13, 15, 19, 20, 21, 22, 31, 32, 33, 34, 36, 37, 38, 39)]
    folds = make_folds(ids, 5)
    assert [f.queries + (f.support,) for f in folds][0] == ("1", "2", "3", "5", "8")  # positions 0..4
    assert folds[4].queries == ("36", "37", "38", "39") and folds[4].support == "1"  # 16..19 and 0
    for f in folds:
        assert len(f.train) == 15 and not set(f.train) & set(f.queries + (f.support,))


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


def test_oracle_scores_one_and_empty_scores_zero(phantom_data):
    folds = make_folds(phantom_data.ids, phantom_data.spec.n_folds)
    for protocol in ("EP1", "EP2"):
        oracle = evaluate(oracle_predictor(phantom_data), phantom_data, folds,
                          classes=phantom_data.spec.classes, protocol=protocol)
        assert oracle["mean"] == 1.0 and set(oracle["per_class"]) == set(phantom_data.spec.classes)
        assert all(d == 1.0 for row in oracle["folds"] for per_q in row["dice"].values() for d in per_q.values())
        empty = evaluate(empty_predictor, phantom_data, folds, classes=phantom_data.spec.classes, protocol=protocol)
        assert empty["mean"] == 0.0


def test_predictor_with_wrong_output_shape_is_refused(phantom_data):
    folds = make_folds(phantom_data.ids, phantom_data.spec.n_folds)
    with pytest.raises(ValueError, match=r"predictor returned shape .* expected .*\(Q, 1, H, W\)"):
        evaluate(lambda s, m, q: torch.zeros(1, 1, 3, 3), phantom_data, folds, classes=["liver"])


def test_class_absent_from_support_volume_names_the_label_file():
    data = _toy_data({"1": _toy_volume((2, 5)), "2": np.zeros((20, 4, 4), dtype=np.uint8)})
    with pytest.raises(DataError, match=r"label_2\.nii\.gz: class 'organ' is absent from the support volume"):
        evaluate(empty_predictor, data, make_folds(data.ids, 1), classes=["organ"])
