"""Shared checks on both few-shot segmenters (tiny models, 32 px): shapes, k supports, save/load,
determinism, the encoder, and every bad input that issue 3 names."""

from __future__ import annotations

import re

import pytest
import torch

from segment.conditional import ConditionalConfig
from segment.encoder import Encoder, EncoderConfig, load_encoder_weights
from segment.pooling import SegmentInputError, cosine_scores, local_prototypes, masked_average_pool
from segment.predict import largest_component, make_predictor
from segment.train import SegmenterConfig, build_model, load, save_checkpoint



R = 32
TINY = dict(width=4, depth=2, dilated_blocks=1, embed_dim=8, resolution=R)


def tiny(kind: str) -> SegmenterConfig:
    """"conditional+positional": Roy et al.'s positional gates instead of similarity gates; "conditional-head":
    without the similarity head on the foreground logit; "prototype+fused": the stem fused into the embedding."""
    if kind == "conditional+positional":
        return SegmenterConfig(model="conditional", similarity_gates=False, spatial_gates=True,
                               similarity_head=False, **TINY)
    if kind == "conditional-head":
        return SegmenterConfig(model="conditional", similarity_head=False, **TINY)
    if kind == "prototype+fused":
        return SegmenterConfig(model="prototype", fuse_stem=True, **TINY)
    return SegmenterConfig(model=kind, **TINY)


def episode(s: int = 1, q: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randn(s, 1, R, R, generator=g)
    masks = torch.zeros(s, 1, R, R)
    masks[:, :, 8:20, 10:22] = 1.0
    return images, masks, torch.randn(q, 1, R, R, generator=g)


@pytest.fixture(params=["prototype", "prototype+fused", "conditional", "conditional+positional", "conditional-head"])
def kind(request) -> str:
    return request.param


def test_forward_shapes_for_any_number_of_supports(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind)).eval()
    for s in (1, 3):
        si, sm, qi = episode(s=s, q=2)
        probs = model.segment(si, sm, qi)
        assert probs.shape == (2, 1, R, R)
        assert torch.all((probs >= 0) & (probs <= 1))
    logits, aux = model.train()(torch.randn(2, 3, 1, R, R), torch.ones(2, 3, 1, R, R).tril(), torch.randn(2, 4, 1, R, R))
    assert logits.shape == (2, 4, 2, R, R) and aux.ndim == 0


def test_supports_change_the_prediction(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind)).eval()
    si, sm, qi = episode()
    other = torch.zeros_like(sm)
    other[:, :, 2:6, 2:30] = 1.0
    assert not torch.allclose(model.segment(si, sm, qi), model.segment(si, other, qi))


def test_checkpoint_round_trip_rebuilds_the_model(kind, tmp_path):
    torch.manual_seed(1)
    model = build_model(tiny(kind)).eval()
    save_checkpoint(tmp_path / "m.pt", model, tiny(kind))
    again = load(tmp_path / "m.pt")
    si, sm, qi = episode()
    assert type(again) is type(model)
    assert torch.equal(model.segment(si, sm, qi), again.segment(si, sm, qi))


def test_seeded_construction_is_deterministic(kind):
    a = [p.clone() for p in (torch.manual_seed(3), build_model(tiny(kind)))[1].parameters()]
    b = [p.clone() for p in (torch.manual_seed(3), build_model(tiny(kind)))[1].parameters()]
    c = [p.clone() for p in (torch.manual_seed(4), build_model(tiny(kind)))[1].parameters()]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


@pytest.mark.parametrize("case, message", [
    ("empty", "support_masks[0] is empty"),
    ("full", "support_masks[0] is all foreground"),
    ("wrong_size", "must be the size of its image"),
    ("k0", "k = 0 supports"),
    ("query_resolution", "query_images have resolution (16, 16)"),
])
def test_bad_inputs_raise_clear_errors(kind, case, message, tmp_path):
    model = build_model(tiny(kind)).eval()
    si, sm, qi = episode()
    if case == "empty":
        sm = torch.zeros_like(sm)
    elif case == "full":
        sm = torch.ones_like(sm)
    elif case == "wrong_size":
        sm = torch.ones(1, 1, R // 2, R // 2)
    elif case == "k0":
        si, sm = si[:0], sm[:0]
    elif case == "query_resolution":
        qi = torch.randn(2, 1, R // 2, R // 2)
    predictor = make_predictor(model)
    with pytest.raises(SegmentInputError, match=re.escape(message)):
        predictor(si, sm, qi)
    with pytest.raises(SegmentInputError):
        model.segment(si, sm, qi)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_query_at_a_resolution_the_model_was_not_built_for(kind):
    model = build_model(tiny(kind)).eval()
    g = torch.Generator().manual_seed(0)
    si, qi = torch.randn(1, 1, 64, 64, generator=g), torch.randn(1, 1, 64, 64, generator=g)
    sm = torch.zeros(1, 1, 64, 64)
    sm[..., 10:30, 10:30] = 1
    with pytest.raises(SegmentInputError, match="model was built for 32 x 32"):
        model.segment(si, sm, qi)


def test_predictor_with_extra_supports_and_postprocessing(kind):
    torch.manual_seed(0)
    model = build_model(tiny(kind)).eval()
    si, sm, qi = episode(q=3)
    extra_i, extra_m, _ = episode(s=2, seed=5)
    plain = make_predictor(model)(si, sm, qi)
    enlarged = make_predictor(model, extra_supports=(extra_i, extra_m))(si, sm, qi)
    assert enlarged.shape == plain.shape == (3, 1, R, R)
    assert not torch.allclose(plain, enlarged)  # the extra supports are used
    post = make_predictor(model, postprocess=True)(si, sm, qi)
    assert set(post.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(SegmentInputError, match="extra_supports masks"):
        make_predictor(model, extra_supports=(extra_i, torch.ones(2, 1, R // 2, R // 2)))


def test_largest_component_keeps_one_3d_blob():
    masks = torch.zeros(4, 10, 10, dtype=torch.bool).numpy()
    masks[0:3, 1:4, 1:4] = True  # 27 voxels
    masks[3, 7:9, 7:9] = True  # 4 voxels, separate
    kept = largest_component(masks)
    assert kept.sum() == 27 and not kept[3].any()


def test_encoder_runs_at_128_and_256_and_loads_a_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    enc = Encoder(config=EncoderConfig(width=4, depth=3, dilated_blocks=1, embed_dim=8)).eval()
    for size in (128, 256):
        assert enc(torch.randn(1, 1, size, size)).shape == (1, 8, size // 8, size // 8)
    torch.save({"encoder": enc.state_dict()}, tmp_path / "enc.pt")
    other = Encoder(config=enc.config).eval()
    load_encoder_weights(other, tmp_path / "enc.pt")
    x = torch.randn(1, 1, 64, 64)
    assert torch.equal(enc(x), other(x))
    wrong = Encoder(config=EncoderConfig(width=8, depth=3, dilated_blocks=1, embed_dim=8))
    with pytest.raises(ValueError, match="enc.pt does not fit EncoderConfig"):
        load_encoder_weights(wrong, tmp_path / "enc.pt")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        load_encoder_weights(other, tmp_path / "missing.pt")


def test_pooling_matches_hand_computation():
    feats = torch.arange(2 * 4 * 4, dtype=torch.float32).reshape(1, 2, 4, 4)
    mask = torch.zeros(1, 1, 4, 4)
    mask[..., :2, :2] = 1
    proto = masked_average_pool(feats, mask)
    assert torch.allclose(proto, torch.tensor([2.5, 18.5]))  # mean of (0, 1, 4, 5) and (16, 17, 20, 21)
    cells = local_prototypes(feats, mask, kernel=2, threshold=0.95)
    assert torch.allclose(cells, proto[None])  # only the fully covered top-left cell
    scores = cosine_scores(feats, proto[None], 20.0)
    assert scores.shape == (1, 4, 4) and torch.all(scores <= 20.0 + 1e-4)


def test_config_rejects_unknown_keys_and_values():
    with pytest.raises(ValueError, match="unknown segmenter config key"):
        SegmenterConfig.from_dict({"model": "prototype", "widht": 3})
    with pytest.raises(ValueError, match="must be one of"):
        SegmenterConfig(model="unet")


def test_self_support_refinement_changes_the_prototype_prediction():
    torch.manual_seed(0)
    model = build_model(tiny("prototype")).eval()
    si, sm, qi = episode(q=3)
    plain = make_predictor(model)(si, sm, qi)
    refined = make_predictor(model, self_support=1)(si, sm, qi)
    assert refined.shape == plain.shape and not torch.allclose(plain, refined)
    with pytest.raises(ValueError, match="needs a prototype model"):
        make_predictor(build_model(tiny("conditional")), self_support=1)


def test_similarity_gate_opens_where_query_features_resemble_the_support_foreground():
    model = build_model(tiny("conditional"))
    fg, bg = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    support = bg[:, None, None].repeat(1, 4, 4)  # (C, h, w): background features ...
    support[:, :2, :2] = fg[:, None, None]  # ... with a foreground corner
    query = bg[:, None, None].repeat(1, 4, 4)
    query[:, 2:, 2:] = fg[:, None, None]  # the foreground elsewhere in the query
    mask = torch.zeros(1, 1, 1, 4, 4)
    mask[..., :2, :2] = 1
    gate = model.similarity_gate(0, torch.stack([support, query])[None], mask)  # (1, 2, 1, 4, 4)
    a, b = float(model.similarity_scale[0]), float(model.similarity_bias[0])
    expect_fg, expect_bg = torch.sigmoid(torch.tensor(a + b)), torch.sigmoid(torch.tensor(-a + b))  # cos 1 vs 0
    assert torch.allclose(gate[0, 1, 0, 2:, 2:], expect_fg) and torch.allclose(gate[0, 1, 0, :2, :2], expect_bg)
    assert torch.allclose(gate[0, 0, 0, :2, :2], expect_fg)  # the support is gated the same way


def test_conditional_config_needs_some_gate():
    with pytest.raises(ValueError, match="needs channel_gates, spatial_gates or similarity_gates"):
        ConditionalConfig(channel_gates=False, spatial_gates=False, similarity_gates=False)


def test_fused_stem_halves_the_output_stride_and_uses_the_stem():
    torch.manual_seed(0)
    enc = Encoder(config=EncoderConfig(width=4, depth=3, dilated_blocks=1, embed_dim=8, fuse_stem=True)).eval()
    assert enc.config.stride == 4 and enc.config.input_multiple == 8
    x = torch.randn(1, 1, 64, 64)
    assert enc(x).shape == (1, 8, 16, 16)
    with torch.no_grad():
        enc.fuse.weight[:, -4:] = 0  # cut the lateral link: the stem no longer reaches the embedding ...
    cut = enc(x)
    with torch.no_grad():
        enc.fuse.weight[:, -4:] = 1
    assert not torch.allclose(cut, enc(x))  # ... so with it the stem's features do
    model = build_model(SegmenterConfig(fuse_stem=True, **{**TINY, "depth": 2}))
    assert model.config.local_kernel == max(1, (R // 2) // 8)  # an 8 x 8 grid of local cells at stride 2
    assert model.eval().segment(*episode()).shape == (2, 1, R, R)
    with pytest.raises(ValueError, match="fuse_stem needs depth >= 2"):
        EncoderConfig(depth=1, fuse_stem=True)


def test_coordinate_channels_make_features_depend_on_position():
    torch.manual_seed(0)
    plain = Encoder(config=EncoderConfig(width=4, depth=2, dilated_blocks=0, embed_dim=8)).eval()
    coords = Encoder(config=EncoderConfig(width=4, depth=2, dilated_blocks=0, embed_dim=8, coords=True)).eval()
    assert coords.stem[0].in_channels == 3
    flat = torch.ones(1, 1, 32, 32)  # the same value everywhere: only position can tell pixels apart
    inner = (slice(None), slice(None), slice(2, 6), slice(2, 6))  # away from the zero-padded border
    assert torch.allclose(plain(flat)[inner], plain(flat)[inner][..., :1, :1].expand(1, 8, 4, 4), atol=1e-5)
    assert not torch.allclose(coords(flat)[inner], coords(flat)[inner][..., :1, :1].expand(1, 8, 4, 4), atol=1e-3)
