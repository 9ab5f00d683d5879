"""Learned-transform pairs (issue 12): registration checkpoint, warp consistency, checks, oracle positions."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from augment.appearance import AppearanceConfig, HistogramAppearance
from augment.config import LearnedConfig
from augment.manifest import LeakageError
from augment.pairs import PairError
from augment.registration import (Registration, RegistrationConfig, RegistrationModel, compose_affine, fit_z_map,
                                  folded_share, load_registration, map_slice, moments_affine_ddf,
                                  train_registration)
from augment.warped_pairs import PairChecks, learned_pairs, oracle_pairs, pair_problem, warp_pair
from segment.data.phantom import phantom_volume
from segment.data.protocol import ep1_support_indices
from augment_helpers import phantom_volumes
from files import snapshot

RES = 32
TINY = RegistrationConfig(resolution=RES, channels=(4, 8, 8, 8), final_channels=(4,), steps=2, batch_size=2,
                          pool_size=4, lncc_kernel=5)


def _square_mask(top: int, left: int, size: int = 8) -> torch.Tensor:
    m = torch.zeros(RES, RES)
    m[top:top + size, left:left + size] = 1
    return m


def _translation(dy: float, dx: float) -> torch.Tensor:
    ddf = torch.zeros(2, RES, RES)
    ddf[0], ddf[1] = dy, dx
    return ddf


class FixedRegistration(RegistrationModel):
    """A registration model whose answer is a given field on slice 0: isolates synthesis from training."""

    def __init__(self, ddf: torch.Tensor):
        super().__init__(TINY)
        self.ddf = ddf

    def register(self, moving, volume, *, slices=None, name="pair"):
        self.check_size(*moving.shape[-2:], f"{name}: the support slice")
        return Registration(target_slice=0, ddf=self.ddf, affine_ddf=torch.zeros_like(self.ddf),
                            similarity=0.9, affine_similarity=0.9)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("registration")
    torch.set_num_threads(1)
    vols = phantom_volumes()
    return train_registration(vols, TINY, out, fold=0, query_volumes=("9",)), vols


def test_checkpoint_round_trip_rebuilds_the_same_model(trained):
    path, vols = trained
    meta = json.loads(path.with_name("config.json").read_text())
    assert meta["kind"] == "registration" and meta["config"]["resolution"] == RES
    assert {r["volume"] for r in meta["provenance"]["pretrain"]} == set(vols)  # images of these volumes only
    a, b = load_registration(path.parent), load_registration(path, resolution=RES)
    assert a.config == TINY
    support = torch.from_numpy(vols["1"][4])
    ra, rb = a.register(support, torch.from_numpy(vols["2"])), b.register(support, torch.from_numpy(vols["2"]))
    assert ra.target_slice == rb.target_slice and torch.equal(ra.ddf, rb.ddf)
    state = torch.load(path, weights_only=True)
    assert all(torch.equal(state["net"][k], v) for k, v in a.net.state_dict().items())


def test_other_resolution_fails_in_one_line_naming_it(trained):
    path, vols = trained
    before = snapshot(path.parent)
    with pytest.raises(PairError, match=r"trained at 32x32, but the input is 64x64") as err:
        load_registration(path.parent, resolution=64)
    assert "\n" not in str(err.value)
    model = load_registration(path.parent)
    big = torch.zeros(8, 64, 64)
    with pytest.raises(PairError, match=r"support 2 -> volume '7': the support slice is 64x64, but the registration "
                                        r"model was trained at 32x32") as err:
        model.register(torch.zeros(64, 64), big, name="support 2 -> volume '7'")
    assert "\n" not in str(err.value)
    assert snapshot(path.parent) == before


def test_training_on_a_query_volume_is_refused_and_writes_nothing(tmp_path):
    with pytest.raises(LeakageError, match=r"query volumes \['2'\]"):
        train_registration(phantom_volumes(2), TINY, tmp_path / "reg", fold=0, query_volumes=("2",))
    assert not (tmp_path / "reg").exists()


def test_known_translation_recovers_the_translated_mask_exactly():
    mask = _square_mask(10, 12)
    image = torch.arange(RES * RES, dtype=torch.float32).reshape(RES, RES)
    warped_image, warped_mask = warp_pair(image, mask, _translation(3, -2))  # out(p) = in(p + (3, -2))
    assert torch.equal(warped_mask, _square_mask(7, 14))
    assert torch.equal(warped_image[5:25, 5:25], torch.roll(image, (-3, 2), (0, 1))[5:25, 5:25])


def test_learned_pairs_keep_image_and_mask_consistent():
    support_mask = _square_mask(10, 12)
    support_image = 2.0 * support_mask - 0.5 + 0.01 * torch.arange(RES * RES).reshape(RES, RES) / RES
    model = FixedRegistration(_translation(3, -2))
    vols = {"a": np.zeros((4, RES, RES), np.float32), "b": np.zeros((4, RES, RES), np.float32)}
    images, masks, info = learned_pairs(support_image[None, None], support_mask[None, None], vols, model, None, 2, 0)
    assert torch.equal(masks[0, 0], _square_mask(7, 14)) and torch.equal(masks[1, 0], _square_mask(7, 14))
    assert torch.equal(images[0, 0] > 1.0, masks[0, 0] > 0.5)  # the bright organ sits exactly under the mask
    assert info["share_passed"] == 1.0 and {p["volume"] for p in info["pairs"]} == {"a", "b"}


def test_folding_check_rejects_a_field_with_folds():
    flip = torch.zeros(2, RES, RES)
    flip[1] = -2.0 * torch.arange(RES, dtype=torch.float32)  # x -> -x: Jacobian determinant -1 everywhere
    assert folded_share(flip) == 1.0 and folded_share(_translation(2, 1)) == 0.0
    reg = Registration(target_slice=0, ddf=flip, affine_ddf=flip, similarity=0.9, affine_similarity=0.9)
    mask = _square_mask(10, 12)
    problem, measures = pair_problem(reg, mask, mask, PairChecks())
    assert problem.startswith("folded share 1.0000 > 0.005") and measures["folded_share"] == 1.0
    smooth = Registration(target_slice=0, ddf=_translation(2, 1), affine_ddf=flip, similarity=0.9,
                          affine_similarity=0.9)
    assert pair_problem(smooth, mask, mask, PairChecks())[0] is None


def test_support_empty_after_warp_fails_in_one_line_naming_the_pair():
    mask = _square_mask(10, 12)
    model = FixedRegistration(_translation(40, 0))  # everything comes from outside the image
    vols = {"7": np.zeros((4, RES, RES), np.float32)}
    with pytest.raises(PairError, match=r"support\(s\) \[0\]: every candidate pair failed the checks \(support 0 -> "
                                        r"volume '7' slice 0: warped mask empty\)") as err:
        learned_pairs(mask[None, None], mask[None, None], vols, model, HistogramAppearance(), 4, 0)
    assert "\n" not in str(err.value)


def test_a_support_whose_warps_all_fail_gives_no_pair_while_the_others_do():
    """CHAOS fold 3: the liver's lowest support slice (a thin tip) vanished under every warp, and the whole
    set, with the two good supports, was refused."""
    kept, lost = _square_mask(10, 12), _square_mask(0, 0, size=4)  # a corner speck the warp moves out of view
    model = FixedRegistration(_translation(0, 6))
    vols = {"a": np.zeros((4, RES, RES), np.float32), "b": np.zeros((4, RES, RES), np.float32)}
    masks_in = torch.stack([kept, lost])[:, None]
    images, masks, info = learned_pairs(masks_in, masks_in, vols, model, None, 4, 0)
    assert info["supports_without_pairs"] == [1]
    assert [p["support"] for p in info["pairs"]] == [0, 0, 0, 0]
    assert all(torch.equal(m[0], _square_mask(10, 6)) for m in masks)  # the kept support, translated
    with pytest.raises(PairError, match=r"support\(s\) \[0\]: every candidate pair failed"):
        learned_pairs(lost[None, None], lost[None, None], vols, model, None, 4, 0)  # no support left: refused


def test_support_at_another_resolution_fails_naming_it():
    model = FixedRegistration(_translation(0, 0))
    mask = torch.zeros(1, 1, 64, 64)
    mask[..., 10:20, 10:20] = 1
    with pytest.raises(PairError, match=r"support pair 0 is 64x64, but the registration model was trained at 32x32"):
        learned_pairs(mask, mask, {"a": np.zeros((2, 64, 64), np.float32)}, model, None, 1, 0)


@pytest.mark.parametrize("scaling, expected", [("axes", (2.0, 1.125)), ("isotropic", (1.5, 1.5)), ("none", (1.0, 1.0))])
def test_affine_scaling_per_axis_isotropic_or_none(scaling, expected):
    moving = (torch.tensor([16.0, 16.0]), torch.tensor([8.0, 4.5]))  # (centroid, spread) per axis: rows, columns
    fixed = (torch.tensor([12.0, 18.0]), torch.tensor([4.0, 4.0]))  # spreads 8 / 4 = 2 and 4.5 / 4 = 1.125
    ddf = moments_affine_ddf(moving, fixed, (RES, RES), max_scale=3.0, scaling=scaling)
    slope = (ddf[:, 13, 19] - ddf[:, 12, 18]) + 1  # p -> c_m + r (p - c_f): one step on each axis moves by r
    assert slope.tolist() == pytest.approx(list(expected), abs=1e-5)
    assert (ddf[:, 12, 18] + torch.tensor([12.0, 18.0])).tolist() == pytest.approx([16.0, 16.0])  # centroids meet
    clipped = moments_affine_ddf(moving, fixed, (RES, RES), max_scale=1.2, scaling=scaling)
    assert ((clipped[:, 13, 19] - clipped[:, 12, 18]) + 1).max() <= 1.2 + 1e-5


def test_unknown_affine_scaling_fails_naming_the_choices():
    with pytest.raises(ValueError, match=r"scaling='shear'; valid: \['axes', 'isotropic', 'none'\]"):
        RegistrationConfig(scaling="shear")


def test_affine_and_deformable_fields_compose_exactly():
    aff = torch.stack(torch.meshgrid(torch.arange(RES).float(), torch.arange(RES).float(), indexing="ij"))
    aff = torch.stack([0.2 * aff[0] + 1.0, -0.1 * aff[1] + 2.0])[None]  # r = (1.2, 0.9)
    u = torch.zeros(1, 2, RES, RES)
    u[0, 0, 5, 7], u[0, 1, 5, 7] = 1.5, -2.0
    total = compose_affine(aff, u)
    p = torch.tensor([5.0, 7.0]) + u[0, :, 5, 7]                          # p + u(p)
    expected = u[0, :, 5, 7] + torch.tensor([0.2 * p[0] + 1.0, -0.1 * p[1] + 2.0])  # u(p) + a(p + u(p))
    assert torch.allclose(total[0, :, 5, 7], expected)


def test_histogram_appearance_takes_the_donor_intensities_per_structure():
    mask = _square_mask(10, 12)
    gen = torch.Generator().manual_seed(0)
    image = torch.where(mask > 0, 1.0, 0.0) + 0.1 * torch.randn(RES, RES, generator=gen)
    donor = torch.where(mask > 0, 3.0, -1.0) + 0.2 * torch.randn(RES, RES, generator=gen)
    out = HistogramAppearance().apply(image, mask, donor, mask)
    for region in (mask > 0, mask == 0):
        assert abs(float(out[region].mean() - donor[region].mean())) < 0.02
        assert abs(float(out[region].std() - donor[region].std())) < 0.02
    # the ranking inside each structure is kept: the appearance changes, the anatomy does not
    inside = mask > 0
    assert torch.equal(torch.argsort(out[inside]), torch.argsort(image[inside]))


def test_slice_histogram_appearance_ignores_the_donor_mask():
    mask = _square_mask(10, 12)
    gen = torch.Generator().manual_seed(0)
    image = torch.where(mask > 0, 1.0, 0.0) + 0.1 * torch.randn(RES, RES, generator=gen)
    donor = torch.where(mask > 0, 3.0, -1.0) + 0.2 * torch.randn(RES, RES, generator=gen)
    look = HistogramAppearance(AppearanceConfig(regions="slice"))
    out = look.apply(image, mask, donor, mask)
    assert torch.equal(out, look.apply(image, mask, donor, torch.zeros_like(mask)))  # a wrong donor region: same
    assert abs(float(out.mean() - donor.mean())) < 0.02 and abs(float(out.std() - donor.std())) < 0.02
    assert torch.equal(torch.argsort(out.flatten()), torch.argsort(image.flatten()))  # monotone: anatomy kept
    with pytest.raises(ValueError, match=r"regions='organ'; valid: \['structure', 'slice'\]"):
        AppearanceConfig(regions="organ")
    with pytest.raises(ValueError, match=r"LearnedConfig.appearance_regions='organ'; valid: \['structure', 'slice'\]"):
        LearnedConfig(appearance_regions="organ")


def test_oracle_pairs_pick_the_ep1_relative_positions():
    depth = 24
    images, labels = [], []
    for v, (z0, z1) in enumerate([(6, 17), (3, 20), (0, 5)]):  # class spans of length 12, 18 and 6
        img = np.broadcast_to(np.arange(depth, dtype=np.float32)[:, None, None] + 100 * v, (depth, RES, RES)).copy()
        lab = np.zeros((depth, RES, RES), np.uint8)
        lab[z0:z1 + 1, 8:16, 8:16] = 1
        images.append(img)
        labels.append(lab)
    labels.append(np.zeros((depth, RES, RES), np.uint8))  # class absent: skipped
    images.append(np.zeros((depth, RES, RES), np.float32))
    out_i, out_m, info = oracle_pairs(images, labels, 9, seed=0)
    expected = {0: [8, 12, 16], 1: [6, 12, 18], 2: [1, 3, 5]}  # z0 + floor(L (2i + 1) / 6)
    for v, picks in expected.items():
        assert picks == ep1_support_indices(labels[v], 1)  # the protocol's own rule agrees
    got = {}
    for k, p in enumerate(info["pairs"]):
        got.setdefault(p["volume"], []).append(p["slice"])
        assert float(out_i[k, 0, 0, 0]) == p["slice"] + 100 * p["volume"]  # the image is that slice
        assert torch.equal(out_m[k, 0], torch.from_numpy(labels[p["volume"]][p["slice"]].astype(np.float32)))
    assert got == expected
    assert info["skipped"] == [{"volume": 3, "why": "class absent"}] or all(s["volume"] == 3 for s in info["skipped"])
    with pytest.raises(PairError, match=r"only 9 slices available from 4 volumes"):
        oracle_pairs(images, labels, 10, seed=0)


def test_z_map_recovers_a_known_slice_shift():
    image, _ = phantom_volume(0, 1, size=RES, depth=16)
    support = torch.from_numpy((image - image.mean()) / image.std())
    target = torch.cat([support[-3:], support[:-3]])  # target slice z + 3 shows support slice z (z < 13)
    z_map = fit_z_map(support, target, config=RegistrationConfig(resolution=RES))
    assert (z_map["slope"], z_map["offset"]) == pytest.approx((1.0, 3.0), abs=0.03)
    assert list(map_slice(z_map, 5, 16, 1)) == [7, 8, 9] and list(map_slice(z_map, 14, 16, 1)) == [15]


def test_support_volume_without_slices_is_refused():
    model = FixedRegistration(_translation(0, 0))
    mask = _square_mask(10, 12)[None, None]
    with pytest.raises(PairError, match=r"support_volume and support_slices go together, one slice index per support "
                                        r"\(1\), got None"):
        learned_pairs(mask, mask, {"a": np.zeros((2, RES, RES), np.float32)}, model, None, 1, 0,
                      support_volume=np.zeros((4, RES, RES), np.float32))
