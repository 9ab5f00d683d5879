"""A learned spatial transform: 2D registration of a support slice onto unlabelled volumes (Zhao et al. 2019).

Zhao et al. (CVPR 2019) learn, from unlabelled scans only, a spatial transform that maps a labelled atlas
onto each scan; warping the atlas image and its label by the same field gives new pairs whose label is
right by construction. Here the atlas is one EP1 support slice and the scans are the fold's unlabelled
training volumes, so the model must also say WHICH slice of a volume the support corresponds to.
Relative z is not good enough for that (REFERENCE.md: 33.9 mask Dice without warp, against 49.9 at the
organ-relative position), so the correspondence is found by similarity:

1. affine pre-alignment: the body outline of each slice (Otsu threshold) gives its centroid and spread
   per axis; the support is scaled and shifted so that its body matches the target slice's body;
2. slice search: every slice of the volume is scored by local normalised cross-correlation (squared
   LNCC, MONAI) with the affinely aligned support; the best `candidates` slices go on;
3. deformable step: MONAI `VoxelMorph` (a `VoxelMorphUNet` predicting a stationary velocity field,
   integrated by scaling and squaring, `DVF2DDF`, so the field is diffeomorphic up to discretisation)
   trained with LNCC + bending energy on slice pairs of the unlabelled volumes matched as in 1-2;
4. the slice with the highest LNCC after the deformable step is the correspondence; the affine and the
   deformable field are composed exactly into one displacement field (the affine is linear).

Displacements are in pixels with MONAI's `Warp` convention: channel 0 moves rows (H), channel 1 columns
(W), and `warped(p) = moving(p + ddf(p))`. The model runs only at the resolution it was trained at.
A checkpoint is a folder `checkpoint.pt` (tensors, read with `weights_only=True`) + `config.json`, the
generator checkpoint format of `augment.training`, with kind "registration" and the unlabelled slices
it learned from as provenance (query volumes are refused, `LeakageError`).
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from monai.losses import BendingEnergyLoss, LocalNormalizedCrossCorrelationLoss
from monai.networks.blocks import Warp
from monai.networks.nets import VoxelMorph, VoxelMorphUNet
from skimage.filters import threshold_otsu

from augment.manifest import Provenance, check_no_leakage, refs
from augment.pairs import PairError
from augment.training import load_checkpoint, make_accelerator, save_checkpoint

KIND = "registration"
# How the affine pre-alignment scales one body onto another: by the ratio of body spreads per axis ("axes"), by
# their geometric mean on both axes ("isotropic": organs keep their aspect ratio), or not at all ("none").
# On CHAOS fold 0's training volumes "axes" gives the best label accuracy (38.6 % of all candidates, against
# 29.6 isotropic and 25.7 none), so it is the default.
SCALINGS = ("axes", "isotropic", "none")


@dataclass(frozen=True)
class RegistrationConfig:
    """Everything that defines the registration model; saved in its checkpoint so the file rebuilds it."""
    resolution: int = 128
    channels: tuple[int, ...] = (16, 32, 32, 32)    # VoxelMorphUNet encoder/decoder widths
    final_channels: tuple[int, ...] = (16,)
    integration_steps: int = 7                      # scaling and squaring; 0 = plain displacement field
    lncc_kernel: int = 9
    bending_weight: float = 0.1                     # BendingEnergyLoss weight (field in pixels); 0.1 beat 1.0 on
    steps: int = 400                                # the training volumes' label accuracy (38.6 vs 35.9, CHAOS fold 0)
    batch_size: int = 8
    lr: float = 1e-3
    pool_size: int = 256                            # training slice pairs matched once before training
    candidates: int = 3                             # slices per volume re-scored after the deformable step
    max_scale: float = 1.5                          # affine body scaling is clipped to [1/max_scale, max_scale]
    scaling: str = "axes"                           # affine scaling: one per axis, one for both, or none (SCALINGS)
    min_body_fraction: float = 0.1                  # slices with less body than this are never matched
    seed: int = 0

    def __post_init__(self):
        if len(self.channels) < 2 or len(self.channels) % 2:
            raise ValueError(f"RegistrationConfig.channels={self.channels} must be an even number of widths "
                             f"(VoxelMorphUNet takes them in down/up pairs)")
        if self.resolution % 2 ** (len(self.channels) // 2):
            raise ValueError(f"RegistrationConfig.resolution={self.resolution} must be divisible by "
                             f"2**{len(self.channels) // 2} for channels={self.channels}")
        for name in ("steps", "batch_size", "pool_size", "candidates", "lncc_kernel"):
            if getattr(self, name) < 1:
                raise ValueError(f"RegistrationConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.max_scale < 1:
            raise ValueError(f"RegistrationConfig.max_scale must be >= 1, got {self.max_scale}")
        if self.scaling not in SCALINGS:
            raise ValueError(f"RegistrationConfig.scaling={self.scaling!r}; valid: {list(SCALINGS)}")

    @staticmethod
    def from_dict(d: dict) -> "RegistrationConfig":
        d = dict(d)
        for key in ("channels", "final_channels"):
            d[key] = tuple(d[key])
        return RegistrationConfig(**d)


@dataclass(frozen=True)
class Registration:
    """One support slice mapped onto one slice of an unlabelled volume.

    `ddf` `(2, H, W)` maps the target grid to the support (affine and deformable composed); `affine_ddf`
    is the affine part alone. Similarities are mean squared LNCC in [0, 1] against the target slice.
    """
    target_slice: int
    ddf: torch.Tensor
    affine_ddf: torch.Tensor
    similarity: float
    affine_similarity: float


class RegistrationModel(torch.nn.Module):
    """VoxelMorph 2D plus the label-free slice search; `register` maps a support slice onto a volume."""

    def __init__(self, config: RegistrationConfig):
        super().__init__()
        self.config = config
        backbone = VoxelMorphUNet(spatial_dims=2, in_channels=2, unet_out_channels=2, channels=config.channels,
                                  final_conv_channels=config.final_channels)
        self.net = VoxelMorph(backbone=backbone, integration_steps=config.integration_steps, spatial_dims=2)
        self.lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=config.lncc_kernel,
                                                        reduction="none")

    def similarity(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Mean squared LNCC of `(B, 1, H, W)` pairs -> `(B,)` in [0, 1] (MONAI's loss is its negative)."""
        return -self.lncc(a, b).flatten(1).mean(1)

    def check_size(self, height: int, width: int, what: str) -> None:
        res = self.config.resolution
        if (height, width) != (res, res):
            raise PairError(f"{what} is {height}x{width}, but the registration model was trained at {res}x{res}; "
                            f"prepare the data at {res} px or retrain the model")

    @torch.no_grad()
    def register(self, moving: torch.Tensor, volume: torch.Tensor, *, slices: np.ndarray | None = None,
                 name: str = "pair") -> Registration:
        """Map `moving` `(H, W)` onto the best-matching slice of `volume` `(Z, H, W)`.

        `slices` restricts the search (e.g. to a given correspondence); by default every slice with
        enough body is a candidate. `name` labels the pair in error messages.
        """
        self.check_size(*moving.shape[-2:], f"{name}: the support slice")
        self.check_size(*volume.shape[-2:], f"{name}: the target volume")
        moving = moving.reshape(1, 1, *moving.shape[-2:]).float()
        volume = volume.float()
        zs = body_slices(volume, self.config.min_body_fraction) if slices is None else np.asarray(slices)
        if len(zs) == 0:
            raise PairError(f"{name}: the target volume has no slice with a body (>= "
                            f"{self.config.min_body_fraction:.0%} of the image above its Otsu threshold)")
        fixed = volume[zs][:, None]                                   # (K, 1, H, W)
        # 1.-2. affine pre-alignment to every candidate slice, scored by LNCC
        aff = torch.stack([body_affine_ddf(moving[0, 0], f[0], self.config) for f in fixed])  # (K, 2, H, W)
        warp = Warp(mode="bilinear", padding_mode="border")
        pre = warp(moving.expand(len(zs), -1, -1, -1), aff)          # (K, 1, H, W)
        aff_sim = self.similarity(pre, fixed)
        keep = torch.argsort(aff_sim, descending=True)[: self.config.candidates]
        # 3. deformable step on the best candidates
        self.eval()
        _, u = self.net(pre[keep], fixed[keep])                      # (k, 2, H, W)
        total = compose_affine(aff[keep], u)
        sim = self.similarity(warp(moving.expand(len(keep), -1, -1, -1), total), fixed[keep])
        # 4. the best slice after the deformable step
        best = int(torch.argmax(sim))
        return Registration(target_slice=int(zs[int(keep[best])]), ddf=total[best], affine_ddf=aff[keep[best]],
                            similarity=float(sim[best]), affine_similarity=float(aff_sim[keep[best]]))


def body_mask(image: torch.Tensor) -> torch.Tensor:
    """`(H, W)` bool: pixels above the slice's Otsu threshold (the body against the air of an MRI)."""
    x = image.numpy().astype(np.float64)
    try:
        return torch.from_numpy(x > threshold_otsu(x))
    except ValueError:  # a constant (or nearly constant) slice has no threshold: no body
        return torch.zeros_like(image, dtype=torch.bool)


def body_slices(volume: torch.Tensor, min_fraction: float) -> np.ndarray:
    """Indices of the slices of `(Z, H, W)` whose body covers at least `min_fraction` of the image."""
    return np.array([z for z in range(len(volume)) if float(body_mask(volume[z]).float().mean()) >= min_fraction],
                    np.int64)


Moments = tuple[torch.Tensor, torch.Tensor] | None  # body centroid and spread per axis, or None (no body)


def _moments(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Centroid and standard deviation per axis (rows, columns) of a `(H, W)` bool mask."""
    ys, xs = torch.nonzero(mask, as_tuple=True)
    pts = torch.stack([ys, xs]).float()                              # (2, N)
    return pts.mean(1), pts.std(1).clamp_min(1.0)


def slice_moments(image: torch.Tensor) -> Moments:
    mask = body_mask(image)
    return _moments(mask) if mask.any() else None


def moments_affine_ddf(moving: Moments, fixed: Moments, shape: tuple[int, int], *, max_scale: float,
                       scaling: str) -> torch.Tensor:
    """`(2, H, W)` displacement that moves a body with `moving` moments onto one with `fixed` moments:
    p -> c_m + r (p - c_f), with r the ratio of body spreads per axis (`scaling` "axes"), their geometric
    mean ("isotropic") or 1 ("none"), clipped to [1/max_scale, max_scale]."""
    h, w = shape
    if moving is None or fixed is None:
        return torch.zeros(2, h, w)
    (c_m, s_m), (c_f, s_f) = moving, fixed
    r = s_m / s_f                                                   # (2,): rows, columns
    if scaling == "isotropic":
        r = r.prod().sqrt().expand(2)
    elif scaling == "none":
        r = torch.ones(2)
    r = r.clamp(1 / max_scale, max_scale)
    grid = torch.stack(torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij"))  # (2, H, W)
    target = c_m[:, None, None] + r[:, None, None] * (grid - c_f[:, None, None])
    return target - grid


def body_affine_ddf(moving: torch.Tensor, fixed: torch.Tensor, config: RegistrationConfig) -> torch.Tensor:
    """`moments_affine_ddf` of two `(H, W)` slices: the body of `moving` moved onto the body of `fixed`."""
    return moments_affine_ddf(slice_moments(moving), slice_moments(fixed), tuple(fixed.shape),
                              max_scale=config.max_scale, scaling=config.scaling)


@torch.no_grad()
def fit_z_map(support_volume: torch.Tensor, target_volume: torch.Tensor, *, config: RegistrationConfig,
              lncc_kernel: int = 5, slopes: tuple[float, float] = (0.6, 1.6), min_overlap: float = 0.6) -> dict:
    """Label-free slice correspondence between two volumes `(Z, H, W)`: z_t = a z_s + b.

    1. every support slice is affinely aligned (body moments) to every target slice at half resolution and
       scored by squared LNCC: a similarity matrix `(Zs, Zt)`;
    2. the line (a, b) with the highest mean row-standardised similarity along it is the correspondence (a
       grid search over slopes in `slopes` and every half-slice offset, among lines that map at least
       `min_overlap` of the support's body slices inside the target); fitting one line through all slices
       at once is more robust than the best match of one slice, which similar neighbouring levels mislead.
    Returns {"slope": a, "offset": b, "score": mean standardised similarity along the line, "overlap"}.
    """
    sv = F.avg_pool2d(support_volume.float()[:, None], 2)[:, 0]       # (Zs, h, w)
    tv = F.avg_pool2d(target_volume.float()[:, None], 2)[:, 0]        # (Zt, h, w)
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=lncc_kernel, reduction="none")
    warp = Warp(mode="bilinear", padding_mode="border")
    ms, mt = [slice_moments(x) for x in sv], [slice_moments(x) for x in tv]
    # 1. similarity matrix
    sim = torch.zeros(len(sv), len(tv))
    for i, m in enumerate(ms):
        if m is None:
            continue
        aff = torch.stack([moments_affine_ddf(m, f, tuple(tv.shape[-2:]), max_scale=config.max_scale,
                                                 scaling=config.scaling) for f in mt])  # (Zt, 2, h, w)
        pre = warp(sv[i].expand(len(tv), 1, -1, -1), aff)
        sim[i] = -lncc(pre, tv[:, None]).flatten(1).mean(1)
    # 2. the best line z_t = a z_s + b, scored by the row-standardised similarity (how much better than the
    #    support slice's average match) averaged over the slices it maps inside the target; lines that map
    #    under `min_overlap` of the support's body slices inside are not considered
    rows = torch.tensor([i for i, m in enumerate(ms) if m is not None])                       # (N,)
    z = (sim[rows] - sim[rows].mean(1, keepdim=True)) / sim[rows].std(1, keepdim=True).clamp_min(1e-6)  # (N, Zt)
    a = torch.linspace(slopes[0], slopes[1], 51)[:, None, None]                               # (A, 1, 1)
    b = torch.arange(-len(tv), len(tv) + 0.5, 0.5)[None, :, None]                            # (1, B, 1)
    j = torch.round(a * rows.float() + b).long()                                              # (A, B, N)
    inside = (j >= 0) & (j < len(tv))
    n_rows = torch.arange(len(rows))[None, None].expand_as(j)
    total = torch.where(inside, z[n_rows, j.clamp(0, len(tv) - 1)], 0.0).sum(-1)
    overlap = inside.float().mean(-1)
    score = torch.where(overlap >= min_overlap, total / inside.sum(-1).clamp_min(1), -torch.inf)
    best = int(torch.argmax(score))
    ia, ib = divmod(best, score.shape[1])
    return {"slope": float(a[ia, 0, 0]), "offset": float(b[0, ib, 0]), "score": float(score[ia, ib]),
            "overlap": float(overlap[ia, ib])}


def map_slice(z_map: dict, z: int, depth: int, window: int) -> np.ndarray:
    """Target slices within `window` of the mapped `z`, clipped to the volume of `depth` slices."""
    centre = int(round(z_map["slope"] * z + z_map["offset"]))
    return np.unique(np.clip(np.arange(centre - window, centre + window + 1), 0, depth - 1))


def compose_affine(aff: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Exact composition of `Warp(Warp(m, aff), u)` into one field `(K, 2, H, W)`.

    With a(p) = c_m + r (p - c_f) - p, the total is u(p) + a(p + u(p)) = a(p) + r u(p): an affine field
    is linear, so nothing is interpolated. `r` is read back from the affine field's slope.
    """
    r = torch.stack([aff[:, 0, 1, 0] - aff[:, 0, 0, 0], aff[:, 1, 0, 1] - aff[:, 1, 0, 0]], 1) + 1.0  # (K, 2)
    return aff + r[:, :, None, None] * u


def folded_share(ddf: torch.Tensor, region: np.ndarray | None = None) -> float:
    """Share of pixels (of `region` `(H, W)` bool, default all) where the map p -> p + ddf(p) folds: Jacobian
    determinant <= 0 (central differences).

    MONAI has no Jacobian-determinant measure for a displacement field, so it is computed here.
    """
    d = ddf.detach().double().numpy()                               # (2, H, W)
    dy_dy, dy_dx = np.gradient(d[0])
    dx_dy, dx_dx = np.gradient(d[1])
    det = (1 + dy_dy) * (1 + dx_dx) - dy_dx * dx_dy
    folded = det <= 0
    return float(folded.mean() if region is None else folded[region].mean() if region.any() else 0.0)


# ---------------------------------------------------------------------------------------------------
# training on unlabelled volumes


def _training_pool(model: RegistrationModel, volumes: Mapping[str, torch.Tensor], gen: torch.Generator,
                   ) -> tuple[torch.Tensor, torch.Tensor, list]:
    """`pool_size` (moving, fixed) pairs: a random body slice of one volume, affinely aligned to its best
    LNCC match in another volume (steps 1-2 of the module docstring). Returns `(P, 1, H, W)` twice."""
    ids = list(volumes)
    usable = {v: body_slices(volumes[v], model.config.min_body_fraction) for v in ids}
    warp = Warp(mode="bilinear", padding_mode="border")
    moving, fixed, used = [], [], []
    for _ in range(model.config.pool_size):
        a, b = torch.randperm(len(ids), generator=gen)[:2].tolist()
        za = int(usable[ids[a]][torch.randint(len(usable[ids[a]]), (1,), generator=gen)])
        m = volumes[ids[a]][za]
        zs = usable[ids[b]]
        f = volumes[ids[b]][zs][:, None]                              # (K, 1, H, W)
        aff = torch.stack([body_affine_ddf(m, fi[0], model.config) for fi in f])
        pre = warp(m.expand(len(zs), 1, -1, -1), aff)
        best = int(torch.argmax(model.similarity(pre, f)))
        moving.append(pre[best])
        fixed.append(f[best])
        used += [(ids[a], za), (ids[b], int(zs[best]))]
    return torch.stack(moving), torch.stack(fixed), used


def train_registration(volumes: Mapping[str, np.ndarray], config: RegistrationConfig, out_dir: str | Path, *,
                       fold: int, query_volumes: tuple[str, ...] = (), cpu: bool = True) -> Path:
    """Train the deformable step on unlabelled `volumes` {id: `(Z, H, W)` float32} (images only, never labels).

    Writes `out_dir/checkpoint.pt` + `config.json` and returns the first. A volume among `query_volumes`
    raises `LeakageError`; a volume at another resolution raises `PairError`; nothing is written then.
    `cpu` is accelerate's flag, as for the generators: false trains the network on the GPU when there is one
    (the slice pool is matched on the CPU either way, and the random draws come from the same CPU generator).
    It must match the process's other accelerators: accelerate refuses `cpu=True` once one has taken a GPU.
    """
    if len(volumes) < 2:
        raise PairError(f"registration needs at least 2 unlabelled volumes, got {len(volumes)}")
    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    model = RegistrationModel(config)
    vols = {}
    for vid, v in volumes.items():
        v = torch.as_tensor(np.asarray(v, np.float32))
        if v.ndim != 3:
            raise PairError(f"unlabelled volume {vid!r} must be (Z, H, W), got {tuple(v.shape)}")
        model.check_size(*v.shape[-2:], f"unlabelled volume {vid!r}")
        vols[str(vid)] = v
    provenance = Provenance(fold=fold, pretrain=tuple(r for vid, v in vols.items() for r in refs(vid, range(len(v)))),
                            query_volumes=tuple(query_volumes), notes="registration: images only, no labels")
    check_no_leakage(provenance)
    t0 = time.time()
    # 1. matched slice pairs, affinely pre-aligned
    moving, fixed, _ = _training_pool(model, vols, gen)              # (P, 1, H, W) each
    pool_seconds = time.time() - t0
    # 2. LNCC + bending energy, Adam, on accelerate's device for the `cpu` flag
    accelerator = make_accelerator(cpu=cpu, mixed_precision="no")
    device = accelerator.device
    model.to(device)
    moving, fixed = moving.to(device), fixed.to(device)
    lncc = LocalNormalizedCrossCorrelationLoss(spatial_dims=2, kernel_size=config.lncc_kernel)
    bending = BendingEnergyLoss()
    opt = torch.optim.Adam(model.net.parameters(), lr=config.lr)
    model.train()
    history = []
    for _ in range(config.steps):
        idx = torch.randint(len(moving), (config.batch_size,), generator=gen).to(device)
        flip = (torch.rand(config.batch_size, generator=gen) < 0.5).to(device)    # either direction of a pair
        m = torch.where(flip[:, None, None, None], fixed[idx], moving[idx])
        f = torch.where(flip[:, None, None, None], moving[idx], fixed[idx])
        warped, ddf = model.net(m, f)
        sim, smooth = lncc(warped, f), bending(ddf)
        loss = sim + config.bending_weight * smooth
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append({"lncc": -sim.item(), "bending": smooth.item()})
    # 3. the checkpoint: tensors (on the CPU) + config.json (augment.training's format)
    provenance = dataclasses.replace(provenance, extra={"pool_seconds": round(pool_seconds, 1),
                                                        "train_seconds": round(time.time() - t0 - pool_seconds, 1)})
    state = {"net": {k: v.detach().cpu() for k, v in model.net.state_dict().items()}}
    return save_checkpoint(Path(out_dir), kind=KIND, config=config, state=state,
                           provenance=provenance, history={"train": history}, accelerator=accelerator)


def load_registration(path: str | Path, *, resolution: int | None = None) -> RegistrationModel:
    """Rebuild a trained model from its checkpoint folder (or `checkpoint.pt`) alone.

    With `resolution`, a model trained at another one raises `PairError` before any weight is read.
    """
    ckpt = load_checkpoint(Path(path), kind=KIND, resolution=resolution)
    model = RegistrationModel(RegistrationConfig.from_dict(ckpt["config"]))
    model.net.load_state_dict(ckpt["state"]["net"])
    return model.eval()
