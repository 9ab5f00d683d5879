"""Turn a trained segmenter into the evaluator's `Predictor`, optionally with an enlarged support set.

`make_predictor(model, extra_supports=(images, masks))` appends extra (image, mask) pairs of the novel
class (real or synthetic) to the supports the protocol gives, so both models see k = 1 + N supports.
The predictor returns working-resolution probabilities; the protocol's evaluator resamples them to the
scoring grid and applies the largest-3D-component step itself, once per assembled query volume. The
optional `postprocess` here acts on one call's query stack only (for use outside the protocol: the
evaluator calls a predictor once per EP1 chunk, so it must not be used there).
"""

from __future__ import annotations

import numpy as np
import torch

from segment.episodes import check_pairs
from segment.pooling import check_episode
from segment.data.protocol import largest_component  # noqa: F401 (re-exported: one implementation)


def make_predictor(model: torch.nn.Module, *, extra_supports: tuple[torch.Tensor, torch.Tensor] | None = None,
                   postprocess: bool = False, self_support: int = 0, threshold: float = 0.5,
                   batch_size: int = 64):
    """A `protocol.Predictor` over `model` (a `PrototypeNet` or `ConditionalNet`, e.g. from `train.load`).

    extra_supports: (images (N, 1, H, W), masks (N, 1, H, W)) appended to every call's supports.
    postprocess: threshold at `threshold` and keep the largest 3D component of this call's query stack
    (not for `protocol.evaluate`, which post-processes whole query volumes itself).
    self_support: refinement rounds that pool prototypes from the queries' own prediction (prototype
    model only; see `PrototypeNet.segment`).
    Returns (Q, 1, H, W): probabilities, or {0, 1} when post-processed.
    """
    if extra_supports is not None:
        check_pairs(*extra_supports, name="extra_supports")
    model = model.eval()
    device = next(model.parameters()).device
    options = {"self_support": self_support} if self_support else {}
    if self_support and not hasattr(model.config, "local_kernel"):
        raise ValueError(f"self_support={self_support} needs a prototype model, got {type(model).__name__}")

    def predict(support_images: torch.Tensor, support_masks: torch.Tensor, query_images: torch.Tensor) -> torch.Tensor:
        # 1. enlarge the support set: (S + N, 1, H, W)
        check_episode(support_images, support_masks, query_images, resolution=model.config.resolution)
        if extra_supports is not None:
            if extra_supports[0].shape[-2:] != support_images.shape[-2:]:
                raise ValueError(f"extra_supports have resolution {tuple(extra_supports[0].shape[-2:])} but the "
                                 f"supports have {tuple(support_images.shape[-2:])}")
            support_images = torch.cat([support_images, extra_supports[0]])
            support_masks = torch.cat([support_masks, extra_supports[1]])
        si, sm = support_images.to(device), support_masks.to(device)
        # 2. segment the queries in batches: (Q, 1, H, W) foreground probability
        probs = torch.cat([model.segment(si, sm, q.to(device), **options).cpu()
                           for q in torch.split(query_images, batch_size)])
        if not postprocess:
            return probs
        # 3. keep the largest 3D component of the thresholded stack
        kept = largest_component(probs[:, 0].numpy() > threshold)
        return torch.from_numpy(kept.astype(np.float32))[:, None]

    return predict
