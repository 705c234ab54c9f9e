"""FLIP's patch dropout (Li et al., 2023): train a ViT on a random subset of its patch tokens.

Legend: B = batch, T = tokens (the class token first, then the patches), P = patches kept, D = width.

open_clip's ``PatchDropout`` draws its random scores with the CPU generator and indexes the
device tensor with CPU indices: on a GPU that is a host-to-device copy that waits for the
queued work, i.e. one host sync per forward. This module draws on the tokens' own device, so a
step stays free of syncs; the GradCache re-forward (``vlp.train.step``) records and replays that
device's RNG state, so a micro-batch's re-forward keeps the same patches.
"""

from __future__ import annotations

import torch
from torch import nn


class PatchDropout(nn.Module):
    """Keep ``max(1, int(patches * (1 - prob)))`` patches per sample, chosen uniformly at random
    on the input's device; the class token (the first, unless ``exclude_first_token`` is False)
    is always kept. The identity in eval mode or with ``prob`` 0."""

    def __init__(self, prob: float, exclude_first_token: bool = True):
        super().__init__()
        if not 0 <= prob < 1:
            raise ValueError(f"patch dropout probability must be in [0, 1), got {prob}")
        self.prob, self.exclude_first_token = float(prob), exclude_first_token

    def forward(self, x_BTD: torch.Tensor) -> torch.Tensor:
        if not self.training or self.prob == 0:
            return x_BTD
        first_B1D, patches_BND = (x_BTD[:, :1], x_BTD[:, 1:]) if self.exclude_first_token else (None, x_BTD)
        b, n, d = patches_BND.shape
        keep = max(1, int(n * (1 - self.prob)))
        idx_BP = torch.rand(b, n, device=x_BTD.device).topk(keep, dim=1).indices
        kept_BPD = patches_BND.gather(1, idx_BP.unsqueeze(-1).expand(b, keep, d))
        return kept_BPD if first_B1D is None else torch.cat([first_B1D, kept_BPD], dim=1)

    def extra_repr(self) -> str:
        return f"prob={self.prob}, exclude_first_token={self.exclude_first_token}"


def set_patch_dropout(model: nn.Module, prob: float) -> None:
    """Install :class:`PatchDropout` with ``prob`` in ``model``'s open_clip ViT image tower
    (replacing open_clip's own, whose probability is kept when ``prob`` is 0).

    Raises:
        ValueError: ``prob`` > 0 and the image tower is not an open_clip VisionTransformer.
    """
    from open_clip.transformer import PatchDropout as OpenClipPatchDropout
    from open_clip.transformer import VisionTransformer

    visual = getattr(model, "visual", None)
    if not isinstance(visual, VisionTransformer):
        if prob > 0:
            raise ValueError(
                f"model.patch_dropout={prob} needs an open_clip ViT image tower; this model's is "
                f"{type(visual).__name__}"
            )
        return
    current = visual.patch_dropout
    if isinstance(current, OpenClipPatchDropout):
        prob = prob or current.prob
        visual.patch_dropout = PatchDropout(prob, current.exclude_first_token)
    elif prob > 0:
        visual.patch_dropout = PatchDropout(prob)
