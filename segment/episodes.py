"""Training episodes: a typed `Episode` and the samplers that draw them.

Three sources, mixed by weight:
- superpixel: a Felzenszwalb superpixel of a training slice is the pseudo-class; support and query are
  two independent augmentations of that slice (SSL-ALPNet's self-supervised task), or, with `span` > 0,
  the query is a neighbouring slice (up to `span` slices away) whose pseudo-mask is the superpixels of
  that slice lying mostly inside the support superpixel (2D superpixels linked across slices, in the
  spirit of ADNet's 3D supervoxels): the query then shows the structure, not a copy of the support;
- supervised: a training class (never a test class) in two different training volumes, support and
  query slices taken from the same third of the class's slice range (EP1-like pairing, Roy et al. 2020);
- pairs: externally supplied (image, mask) pairs, e.g. synthetic pairs from `augment/`, with support and
  query drawn from the pool (two different pairs when the pool holds more than one).
Every sampler draws only from a `numpy.random.Generator` it is given, so an episode is a pure function
of that generator's state: training seeds one per step and resumes exactly.
"""

from __future__ import annotations

from dataclasses import dataclass

import albumentations as A
import numpy as np
import torch

from segment.pooling import SegmentInputError


@dataclass(frozen=True)
class Episode:
    """One 1-way task: segment the class marked in the supports on the queries."""

    support_images: torch.Tensor  # (S, 1, H, W) float32
    support_masks: torch.Tensor  # (S, 1, H, W) float32 in {0, 1}
    query_images: torch.Tensor  # (Q, 1, H, W) float32
    query_masks: torch.Tensor  # (Q, 1, H, W) float32 in {0, 1}
    source: str  # "superpixel" | "supervised" | "pairs"
    class_id: int | None = None  # training class of a supervised episode
    volume_ids: tuple[str, ...] = ()
    chunk: int | None = None  # third of the class range (supervised episodes)


def collate(episodes: list[Episode]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stack B episodes of equal S and Q: `(B, S, 1, H, W)` x2 and `(B, Q, 1, H, W)` x2."""
    return tuple(torch.stack([getattr(e, name) for e in episodes])
                 for name in ("support_images", "support_masks", "query_images", "query_masks"))


@dataclass(frozen=True)
class AugmentParams:
    """Geometric and intensity augmentation (albumentations), applied independently to support and query."""

    rotate: float = 15.0  # degrees
    scale: tuple[float, float] = (0.85, 1.2)
    translate: float = 0.08  # fraction of the size
    shear: float = 8.0
    elastic_alpha: float = 15.0
    elastic_sigma: float = 5.0
    gamma: tuple[float, float] = (0.6, 1.6)
    noise: float = 0.03  # Gaussian noise std on the [0, 1] scale


class Augmenter:
    """Seeded albumentations pipeline for (image (H, W) z-scored float, mask (H, W)) pairs.

    Intensities are mapped to [0, 1] by the slice's range so gamma is defined, then mapped back.
    """

    def __init__(self, params: AugmentParams | None = AugmentParams()) -> None:
        self.params = params
        if params is None:
            self.transform = None
            return
        p = params
        self.transform = A.Compose([
            A.Affine(scale=p.scale, rotate=(-p.rotate, p.rotate), translate_percent=(-p.translate, p.translate),
                     shear=(-p.shear, p.shear), p=1.0),
            A.ElasticTransform(alpha=p.elastic_alpha, sigma=p.elastic_sigma, p=0.5),
            A.RandomGamma(gamma_limit=(100 * p.gamma[0], 100 * p.gamma[1]), p=1.0),
            A.GaussNoise(std_range=(0.0, p.noise), p=0.5),
        ], seed=0)

    def __call__(self, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        if self.transform is None:
            return image.astype(np.float32), mask.astype(np.float32)
        lo, hi = float(image.min()), float(image.max())
        span = max(hi - lo, 1e-6)
        self.transform.set_random_seed(int(rng.integers(2 ** 31)))
        out = self.transform(image=((image - lo) / span).astype(np.float32), mask=mask.astype(np.uint8))
        return (np.clip(out["image"], 0, 1) * span + lo).astype(np.float32), out["mask"].astype(np.float32)


def _pair_tensors(pairs: list[tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor]:
    images = torch.from_numpy(np.stack([im for im, _ in pairs]))[:, None]
    masks = torch.from_numpy(np.stack([m for _, m in pairs]))[:, None]
    return images, masks  # (N, 1, H, W) each


def _augment_valid(augment: Augmenter, image: np.ndarray, mask: np.ndarray, rng: np.random.Generator,
                   min_pixels: int, tries: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Augment until the mask keeps at least `min_pixels` foreground and some background."""
    for _ in range(tries):
        im, m = augment(image, mask, rng)
        if min_pixels <= m.sum() < m.size:
            return im, m
    return image.astype(np.float32), mask.astype(np.float32)


class SuperpixelSampler:
    """Self-supervised episodes: one superpixel of one slice is the pseudo-class.

    span = 0: support and query are two augmentations of the slice (SSL-ALPNet). span > 0: the query is
    slice z + d, d drawn uniformly from [-span, span], masked by `linked_mask`; when the link is weak
    (IoU with the support mask below `min_iou`, or too few pixels) the query falls back to slice z.
    """

    def __init__(self, images: dict[str, np.ndarray], segments: dict[str, np.ndarray], *, augment: Augmenter,
                 min_pixels: int = 16, n_supports: int = 1, span: int = 0, min_iou: float = 0.3) -> None:
        if span < 0:
            raise SegmentInputError(f"span must be >= 0 slices, got {span}")
        self.images, self.segments, self.augment = images, segments, augment
        self.min_pixels, self.n_supports, self.span, self.min_iou = min_pixels, n_supports, span, min_iou
        # (volume id, slice, candidate superpixel labels) for every slice with a usable superpixel
        self.slices = []
        for vid, seg in segments.items():
            for z in range(seg.shape[0]):
                counts = np.bincount(seg[z].ravel())
                labels = np.flatnonzero(counts >= min_pixels)
                labels = labels[(labels > 0) & (counts[labels] < 0.5 * seg[z].size)]
                if len(labels):
                    self.slices.append((vid, z, labels))
        if not self.slices:
            raise SegmentInputError(f"no superpixel of at least {min_pixels} pixels in volumes {sorted(segments)}")

    def query_slice(self, vid: str, z: int, mask: np.ndarray, rng: np.random.Generator) -> tuple[int, np.ndarray]:
        """(slice, pseudo-mask) of the query: a linked neighbour within `span`, else slice z itself."""
        if self.span == 0:
            return z, mask
        seg = self.segments[vid]
        d = int(rng.integers(-self.span, self.span + 1))
        if d == 0 or not 0 <= z + d < seg.shape[0]:
            return z, mask
        linked = linked_mask(seg[z + d], mask)
        iou = (linked & mask).sum() / max(1, (linked | mask).sum())
        if linked.sum() < self.min_pixels or iou < self.min_iou:
            return z, mask
        return z + d, linked

    def sample(self, rng: np.random.Generator) -> Episode:
        vid, z, labels = self.slices[int(rng.integers(len(self.slices)))]
        label = int(labels[int(rng.integers(len(labels)))])
        image, mask = self.images[vid][z], (self.segments[vid][z] == label)
        pairs = [_augment_valid(self.augment, image, mask, rng, self.min_pixels) for _ in range(self.n_supports)]
        zq, qmask = self.query_slice(vid, z, mask, rng)
        pairs.append(_augment_valid(self.augment, self.images[vid][zq], qmask, rng, self.min_pixels))
        si, sm = _pair_tensors(pairs[:-1])
        qi, qm = _pair_tensors(pairs[-1:])
        return Episode(si, sm, qi, qm, source="superpixel", volume_ids=(vid,))


def linked_mask(segments: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(H, W) bool: the superpixels of `segments` (H, W) that lie mostly (> 50 %) inside `mask` (H, W).

    Links a superpixel to the neighbouring slice by overlap; label 0 (outside the body) never joins.
    """
    counts = np.bincount(segments.ravel())
    inside = np.bincount(segments.ravel(), weights=mask.ravel().astype(np.float64), minlength=len(counts))
    keep = inside > 0.5 * np.maximum(counts, 1)
    keep[0] = False
    return keep[segments]


class SupervisedSampler:
    """Episodes from training-class labels: support and query from different volumes, same third of the range.

    `labels` must already hide every test class (the caller applies the Setting); `class_ids` lists the
    training classes to draw from and must not contain a test class.
    """

    def __init__(self, images: dict[str, np.ndarray], labels: dict[str, np.ndarray], class_ids: tuple[int, ...], *,
                 augment: Augmenter, allowed: dict[str, np.ndarray] | None = None, min_pixels: int = 16,
                 n_supports: int = 1, n_chunks: int = 3) -> None:
        self.images, self.labels, self.augment = images, labels, augment
        self.min_pixels, self.n_supports, self.n_chunks = min_pixels, n_supports, n_chunks
        # class id -> list of (volume id, slices with the class, split into chunks)
        self.index: dict[int, list[tuple[str, list[np.ndarray]]]] = {}
        for c in class_ids:
            entries = []
            for vid, lab in labels.items():
                area = (lab == c).sum(axis=(1, 2))
                ok = area >= min_pixels
                if allowed is not None:
                    ok &= allowed[vid]
                zs = np.flatnonzero(ok)
                if len(zs) >= n_chunks:
                    entries.append((vid, np.array_split(zs, n_chunks)))
            if len(entries) >= 2:
                self.index[c] = entries
        if not self.index:
            raise SegmentInputError(f"no training class among {list(class_ids)} appears in two or more volumes "
                                    f"of {sorted(labels)}; supervised episodes need at least two")
        self.class_ids = tuple(sorted(self.index))

    def sample(self, rng: np.random.Generator) -> Episode:
        c = self.class_ids[int(rng.integers(len(self.class_ids)))]
        entries = self.index[c]
        chunk = int(rng.integers(self.n_chunks))
        picks = rng.choice(len(entries), size=min(self.n_supports + 1, len(entries)), replace=False)
        picks = list(picks) + [picks[0]] * (self.n_supports + 1 - len(picks))  # few volumes: reuse the first
        pairs, vids = [], []
        for k in picks:
            vid, chunks = entries[int(k)]
            z = int(chunks[chunk][int(rng.integers(len(chunks[chunk])))])
            pairs.append(_augment_valid(self.augment, self.images[vid][z], self.labels[vid][z] == c, rng,
                                        self.min_pixels))
            vids.append(vid)
        si, sm = _pair_tensors(pairs[:-1])
        qi, qm = _pair_tensors(pairs[-1:])
        return Episode(si, sm, qi, qm, source="supervised", class_id=c, volume_ids=tuple(vids), chunk=chunk)


def check_pairs(images: torch.Tensor, masks: torch.Tensor, *, name: str = "extra_pairs") -> None:
    """Raise `SegmentInputError` unless `images`, `masks` are matching `(N, 1, H, W)` pairs with N >= 1,
    binary masks, and foreground plus background in every mask."""
    if images.ndim != 4 or images.shape[1] != 1 or images.shape[0] == 0:
        raise SegmentInputError(f"{name} images must have shape (N, 1, H, W) with N >= 1, got {tuple(images.shape)}")
    if masks.shape != images.shape:
        raise SegmentInputError(f"{name} masks have shape {tuple(masks.shape)} but images have {tuple(images.shape)}")
    if not torch.all((masks == 0) | (masks == 1)):
        raise SegmentInputError(f"{name} masks must be binary (0 or 1)")
    fg = masks.flatten(1).sum(1)
    bad = torch.nonzero((fg == 0) | (fg == masks[0].numel())).flatten().tolist()
    if bad:
        raise SegmentInputError(f"{name} masks {bad[:10]} are empty or all foreground; each pair needs both")


class PairSampler:
    """Episodes from a pool of (image, mask) pairs of one class (synthetic pairs, or real supports)."""

    def __init__(self, images: torch.Tensor, masks: torch.Tensor, *, augment: Augmenter, min_pixels: int = 4,
                 n_supports: int = 1, name: str = "extra_pairs") -> None:
        check_pairs(images, masks, name=name)
        self.images, self.masks = images[:, 0].numpy(), masks[:, 0].numpy()
        self.augment, self.min_pixels, self.n_supports = augment, min_pixels, n_supports

    def sample(self, rng: np.random.Generator) -> Episode:
        n = len(self.images)
        picks = rng.choice(n, size=self.n_supports + 1, replace=n < self.n_supports + 1)
        pairs = [_augment_valid(self.augment, self.images[k], self.masks[k], rng, self.min_pixels) for k in picks]
        si, sm = _pair_tensors(pairs[:-1])
        qi, qm = _pair_tensors(pairs[-1:])
        return Episode(si, sm, qi, qm, source="pairs")


class MixedSampler:
    """Draws from several samplers with the given weights (weights need not sum to 1)."""

    def __init__(self, samplers: dict[str, tuple[object, float]]) -> None:
        live = {k: v for k, v in samplers.items() if v[1] > 0}
        if not live:
            raise SegmentInputError(f"episode mix {dict((k, w) for k, (_, w) in samplers.items())} has no "
                                    "source with a positive weight")
        self.names = tuple(live)
        self.samplers = [live[k][0] for k in self.names]
        weights = np.array([live[k][1] for k in self.names], dtype=np.float64)
        self.weights = weights / weights.sum()

    def sample(self, rng: np.random.Generator) -> Episode:
        return self.samplers[int(rng.choice(len(self.samplers), p=self.weights))].sample(rng)
