"""Appearance transforms: give a warped support another subject's intensities, structure by structure.

Zhao et al. (CVPR 2019) learn an additive intensity-change field between the atlas and each unlabelled
scan; here the baseline that REFERENCE.md measured (75.3 EP1 against 74.6 without it) is used: histogram
matching, done per structure so that the organ takes the donor's organ intensities and the rest takes the
donor's background. The donor regions come without labels: the registration that maps the support onto
the donor slice carries the support mask there, so "inside the warped mask" of the donor slice is the
donor's organ as far as the registration knows. The transform works at any resolution (it has no
weights), so it has no resolution to check.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from augment.config import APPEARANCE_REGIONS as REGIONS

METHODS = ("histogram",)


@dataclass(frozen=True)
class AppearanceConfig:
    method: str = "histogram"      # quantile mapping inside and outside the mask separately
    quantiles: int = 101           # quantile levels matched per region
    regions: str = "structure"     # one of REGIONS

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"AppearanceConfig.method={self.method!r}; valid: {list(METHODS)}")
        if self.regions not in REGIONS:
            raise ValueError(f"AppearanceConfig.regions={self.regions!r}; valid: {list(REGIONS)}")
        if self.quantiles < 2:
            raise ValueError(f"AppearanceConfig.quantiles must be >= 2, got {self.quantiles}")


def _match_region(values: np.ndarray, reference: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Map `values` so that their quantiles at `levels` become those of `reference` (piecewise linear)."""
    src_q = np.quantile(values, levels)
    ref_q = np.quantile(reference, levels)
    src_q = np.maximum.accumulate(src_q + np.arange(len(src_q)) * 1e-9)  # strictly increasing for np.interp
    return np.interp(values, src_q, ref_q)


@dataclass(frozen=True)
class HistogramAppearance:
    """Per-structure histogram matching (the crude appearance transform of REFERENCE.md, per region)."""
    config: AppearanceConfig = AppearanceConfig()

    def apply(self, image: torch.Tensor, mask: torch.Tensor, donor: torch.Tensor, donor_mask: torch.Tensor
              ) -> torch.Tensor:
        """`image` `(H, W)` with the intensity distribution of `donor` `(H', W')`: with regions "structure",
        inside `mask` matched to inside `donor_mask` and outside to outside (a region empty on either side
        keeps its intensities); with "slice", the whole image to the whole donor, so that no donor region is
        needed (the donor mask is a registration's guess, right about half the time on CHAOS)."""
        x, m = image.numpy().astype(np.float64), mask.numpy() > 0.5
        d, dm = donor.numpy().astype(np.float64), donor_mask.numpy() > 0.5
        levels = np.linspace(0.0, 1.0, self.config.quantiles)
        out = x.copy()
        whole = (np.ones_like(m), np.ones_like(dm))
        pairs = ((m, dm), (~m, ~dm)) if self.config.regions == "structure" else (whole,)
        for region, donor_region in pairs:
            if region.any() and donor_region.any():
                out[region] = _match_region(x[region], d[donor_region], levels)
        return torch.from_numpy(out.astype(np.float32))


def restyle_slices(images: torch.Tensor, heights: Sequence[float], volumes: Mapping[str, np.ndarray], seed: int,
                   ) -> tuple[torch.Tensor, list[tuple[str, int]]]:
    """`images` `(N, 1, H, W)` each histogram-matched, whole slice, to the slice at the same relative height
    (`heights`, 0 = first slice, 1 = last) of a volume drawn from `volumes` {id: `(Z, H, W)`} (images only);
    and each image's donor (volume, slice). The volume is drawn per image from a generator seeded by `seed`."""
    if not volumes:
        raise ValueError("restyling needs at least one donor volume")
    look = HistogramAppearance(AppearanceConfig(regions="slice"))
    rng = np.random.default_rng(seed)
    ids = sorted(volumes)
    out, donors = images.clone(), []
    for k, h in enumerate(heights):
        v = ids[int(rng.integers(len(ids)))]
        z = int(round(float(h) * (len(volumes[v]) - 1)))
        donor = torch.from_numpy(np.asarray(volumes[v][z], np.float32))
        whole = torch.ones_like(donor)
        out[k, 0] = look.apply(images[k, 0], torch.ones_like(images[k, 0]), donor, whole)
        donors.append((v, z))
    return out, donors
