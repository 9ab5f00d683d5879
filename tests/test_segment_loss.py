"""The training loss of the segmenters: soft Dice by hand, each model's own loss weights, and why the
conditional net's background weight decides whether it over-segments (issue 13)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from segment.config import SegmenterConfig
from segment.train import episode_loss, soft_dice_loss


def fixed_model(logits: torch.Tensor, aux: float = 0.0):
    """A stand-in model that returns `logits` (B, Q, 2, H, W) whatever the episode."""
    return lambda si, sm, qi: (logits, torch.tensor(aux))


def batch(masks: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """An episode batch whose query masks are `masks` (B, Q, 1, H, W); images do not matter here."""
    b, q = masks.shape[:2]
    ones = torch.ones(b, 1, 1, *masks.shape[-2:])
    return ones, ones, torch.ones(b, q, 1, *masks.shape[-2:]), masks


def test_soft_dice_loss_matches_a_hand_computed_value():
    # p(fg) = 0.75 on each of 4 pixels, one of them foreground:
    # Dice = (2 * 0.75 + 1) / (4 * 0.75 + 1 + 1) = 0.5
    logits = torch.zeros(1, 2, 2, 2)
    logits[:, 1] = math.log(3.0)
    target = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]])
    assert soft_dice_loss(logits, target).item() == pytest.approx(0.5, abs=1e-6)
    sure = torch.stack([-20 * (target - 0.5), 20 * (target - 0.5)], dim=1)  # confident and right
    assert soft_dice_loss(sure, target).item() == pytest.approx(0.0, abs=1e-6)


def test_each_model_reads_its_own_loss_weights():
    changed = dict(bg_weight=0.3, conditional_bg_weight=0.7, conditional_dice_weight=2.0)
    assert SegmenterConfig(model="prototype", **changed).loss_weights() == (0.3, 0.0)
    assert SegmenterConfig(model="conditional", **changed).loss_weights() == (0.7, 2.0)
    # the prototype net's loss is what it was: ALPNet's weighted cross-entropy plus alignment
    masks = (torch.rand(2, 3, 1, 8, 8, generator=torch.Generator().manual_seed(0)) > 0.7).float()
    logits = torch.randn(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    old = F.cross_entropy(logits.flatten(0, 1), masks.flatten(0, 1)[:, 0].long(),
                          weight=torch.tensor([0.1, 1.0])) + 0.5
    proto = SegmenterConfig(model="prototype", conditional_dice_weight=3.0)
    assert episode_loss(fixed_model(logits, aux=0.5), batch(masks), proto).item() == pytest.approx(old.item())
    cond = SegmenterConfig(model="conditional", conditional_bg_weight=1.0, conditional_dice_weight=2.0)
    expected = (F.cross_entropy(logits.flatten(0, 1), masks.flatten(0, 1)[:, 0].long())
                + 2.0 * soft_dice_loss(logits.flatten(0, 1), masks.flatten(0, 1)[:, 0]))
    assert episode_loss(fixed_model(logits), batch(masks), cond).item() == pytest.approx(expected.item())


def fitted_foreground_probability(config: SegmenterConfig, fraction: float) -> float:
    """p(fg) of the constant prediction that minimises `episode_loss` on queries with `fraction` foreground."""
    masks = torch.zeros(1, 1, 1, 10, 10)
    masks.view(-1)[: round(fraction * 100)] = 1.0
    free = torch.zeros(2, requires_grad=True)  # one pair of logits for every pixel
    opt = torch.optim.Adam([free], lr=0.1)
    for _ in range(300):
        logits = free[None, None, :, None, None].expand(1, 1, 2, 10, 10)
        loss = episode_loss(fixed_model(logits), batch(masks), config)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return torch.softmax(free.detach(), 0)[1].item()


def test_a_background_weight_below_one_makes_a_free_classifier_over_segment():
    # Weighted cross-entropy is minimised at p = f / (f + w (1 - f)): with w = 0.1 and 20 % foreground
    # that is 0.71, so every pixel is called foreground; unweighted, p is the true 0.2.
    weighted = SegmenterConfig(model="conditional", conditional_bg_weight=0.1, conditional_dice_weight=0.0)
    balanced = SegmenterConfig(model="conditional", conditional_bg_weight=1.0, conditional_dice_weight=0.0)
    assert fitted_foreground_probability(weighted, 0.2) == pytest.approx(0.2 / (0.2 + 0.1 * 0.8), abs=0.02)
    assert fitted_foreground_probability(balanced, 0.2) == pytest.approx(0.2, abs=0.02)


@pytest.mark.parametrize("key, value, message", [
    ("conditional_bg_weight", 0.0, "conditional_bg_weight must be > 0, got 0.0"),
    ("bg_weight", -1.0, "bg_weight must be > 0, got -1.0"),
    ("conditional_dice_weight", -0.5, "conditional_dice_weight must be >= 0, got -0.5"),
    ("conditional_dice_weight", float("nan"), "conditional_dice_weight must be >= 0, got nan"),
])
def test_bad_loss_weights_name_the_key_and_value(key, value, message):
    with pytest.raises(ValueError, match=message):
        SegmenterConfig.from_dict({"model": "conditional", key: value})


def test_the_similarity_head_lifts_the_ceiling_that_the_classifier_bias_sets():
    # Without the head a pixel whose last features are silent gets p(fg) = sigmoid(b_fg - b_bg) and no
    # pixel can go above what the features add; the trained nets of issue 13 sat at that ceiling
    # (0.46-0.49 everywhere). With the head, pixels like the support's structure get the foreground.
    from segment.train import build_model

    torch.manual_seed(0)
    image = torch.zeros(1, 1, 32, 32)
    image[..., 8:20, 10:22] = 3.0  # a bright square on a dark background, and its mask
    mask = (image > 0).float()
    for head in (False, True):
        model = build_model(SegmenterConfig(model="conditional", width=4, resolution=32, similarity_head=head)).eval()
        with torch.no_grad():
            model.classifier.weight.zero_()
            model.classifier.bias.copy_(torch.tensor([2.0, -2.0]))  # p(fg) = 0.018 where features add nothing
            if head:
                model.head_scale.fill_(50.0)
        p = model.segment(image, mask, image)[0, 0]  # (H, W), the support as its own query
        if head:
            assert p[mask[0, 0] > 0].mean() > 0.5 and p[mask[0, 0] == 0].mean() < 0.5
        else:
            assert p.max().item() == pytest.approx(torch.sigmoid(torch.tensor(-4.0)).item(), abs=1e-4)


def test_the_similarity_head_needs_similarity_gates():
    from segment.conditional import ConditionalConfig

    with pytest.raises(ValueError, match="similarity_head needs similarity_gates"):
        ConditionalConfig(similarity_head=True, similarity_gates=False, spatial_gates=True)


def test_a_checkpoint_written_before_the_head_and_loss_fields_rebuilds_the_model_it_holds(tmp_path):
    # A conditional checkpoint from before issue 13 has no similarity_head or conditional_* keys; it must
    # load as what it was (no head, background weight = its bg_weight), whatever today's defaults are.
    from dataclasses import asdict

    from segment.train import build_model, checkpoint_config, load, save_checkpoint

    old = SegmenterConfig(model="conditional", width=4, resolution=32, similarity_head=False,
                          conditional_bg_weight=0.1, conditional_dice_weight=0.0)
    torch.manual_seed(0)
    model = build_model(old).eval()
    save_checkpoint(tmp_path / "model.pt", model, old)
    state = torch.load(tmp_path / "model.pt", weights_only=True)
    for key in ("similarity_head", "conditional_bg_weight", "conditional_dice_weight"):
        del state["config"][key]
    torch.save(state, tmp_path / "model.pt")
    assert asdict(checkpoint_config(state["config"])) == asdict(old)
    image = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    mask = (image > 0.5).float()
    assert torch.equal(load(tmp_path / "model.pt").segment(image, mask, image), model.segment(image, mask, image))


def test_the_head_without_similarity_gates_fails_when_the_config_is_read():
    # one [segment] table serves both models, so an experiment config fails at load, before any stage runs
    from pipelines.config import ConfigError, parse

    with pytest.raises(ValueError, match="similarity_head = true needs similarity_gates = true"):
        SegmenterConfig.from_dict({"model": "conditional", "similarity_gates": False, "spatial_gates": True})
    raw = {"name": "t", "data": {"path": "somewhere", "resolution": 64}, "arms": [{"name": "real-only"}],
           "segment": {"similarity_gates": False, "spatial_gates": True}}
    with pytest.raises(ConfigError, match=r"\[segment\] SegmenterConfig.similarity_head = true needs similarity_gates"):
        parse(raw)
    raw["segment"]["similarity_head"] = False
    assert parse(raw).segment["similarity_gates"] is False
    raw["segment"] = {"conditional_dice_weight": -1.0}
    with pytest.raises(ConfigError, match=r"\[segment\] SegmenterConfig.conditional_dice_weight must be >= 0, got -1.0"):
        parse(raw)
