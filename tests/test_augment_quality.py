import numpy as np
import pytest
import torch

from augment.pairs import PairError
from augment.quality import (EncoderConfig, feature_frechet_distance, frechet_distance,
                             intensity_histogram_distance, mask_consistency, nearest_neighbour_distance,
                             train_feature_encoder)
from augment_helpers import ellipse_masks, images_for


def test_frechet_distance_of_shifted_gaussians_is_the_squared_shift():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4000, 3))
    shift = np.array([1.0, 2.0, 0.0])
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-4)
    # same covariance, so FD = ||mu_a - mu_b||^2 = 5
    assert frechet_distance(a, a + shift) == pytest.approx(5.0, abs=1e-3)
    with pytest.raises(PairError, match="at least 2"):
        frechet_distance(a[:1], a)


def test_self_trained_encoder_separates_real_from_noise():
    masks = ellipse_masks(64, seed=0)
    real = torch.from_numpy(images_for(masks, seed=0))
    other_real = torch.from_numpy(images_for(ellipse_masks(64, seed=1), seed=1))
    noise = torch.randn(64, 1, 32, 32) * real.std() + real.mean()
    enc = train_feature_encoder(real, EncoderConfig(channels=(8, 16), steps=30, batch_size=16))
    assert feature_frechet_distance(enc, real, other_real) < feature_frechet_distance(enc, real, noise)


def _threshold_segmenter(support_images, support_masks, query_images):
    """A segmenter that uses the support only to pick a threshold halfway between fg and bg means."""
    fg = support_images[support_masks > 0.5].mean()
    bg = support_images[support_masks < 0.5].mean()
    return (query_images > (fg + bg) / 2).float()


def test_mask_consistency_rewards_images_that_follow_their_mask():
    masks = ellipse_masks(6, seed=2)
    support = (images_for(masks[:2]), masks[:2])
    follows = mask_consistency(_threshold_segmenter, *support, images_for(masks[2:], seed=3), masks[2:])
    shuffled = mask_consistency(_threshold_segmenter, *support, images_for(masks[2:], seed=3), masks[[3, 4, 5, 2]])
    assert follows["mean_dice"] > 0.9 and shuffled["mean_dice"] < follows["mean_dice"] - 0.2
    assert len(follows["per_pair"]) == 4
    with pytest.raises(PairError, match="segmenter returned"):
        mask_consistency(lambda s, m, q: q[:, :, :8], *support, support[0], support[1])


def test_intensity_histogram_distance():
    x = torch.randn(4, 1, 16, 16)
    assert intensity_histogram_distance(x, x) == 0.0
    assert intensity_histogram_distance(x * 0.1 - 1.5, x * 0.1 + 4) == pytest.approx(1.0)
    masks = torch.from_numpy(ellipse_masks(4, res=16))
    inside = intensity_histogram_distance(x, x + 3 * masks, real_masks=masks, synthetic_masks=masks)
    assert inside > intensity_histogram_distance(x, x + 3 * masks)
    with pytest.raises(PairError, match="NaN"):
        intensity_histogram_distance(x, x * float("nan"))


def test_nearest_neighbour_distance_detects_copies():
    train = torch.randn(10, 1, 8, 8)
    assert nearest_neighbour_distance(train, train[:3])["mean"] == pytest.approx(0, abs=1e-5)
    assert nearest_neighbour_distance(train, torch.randn(3, 1, 8, 8))["min"] > 0.5
