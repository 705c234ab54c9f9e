"""CLIP's symmetric InfoNCE loss, exact across ranks.

Legend: B = this rank's batch, N = global batch (W * B), D = feature dim, K = hard negatives
per image.

Gradient convention: every rank returns the same value (the global loss, the mean over all N
rows), and after DDP's mean all-reduce of parameter gradients the gradient equals that of the
single-process loss on the concatenated global batch. Each rank differentiates only its own
rows; gathered features carry gradients back to the rank that produced them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.losses.distributed import all_gather_with_grad, group_rank_world, mean_over_ranks

IMPLS = ("gather",)


def _gather_infonce(img_BD, txt_BD, logit_scale, group, neg_txt_BKD, label_smoothing):
    rank, world = group_rank_world(group)
    img_ND = all_gather_with_grad(img_BD, group)
    txt_ND = all_gather_with_grad(txt_BD, group)
    B = img_BD.shape[0]
    labels_B = torch.arange(B, device=img_BD.device) + rank * B
    logits_i2t_BN = logit_scale * img_BD @ txt_ND.T
    if neg_txt_BKD is not None:
        # NegCLIP: every image also scores every rank's hard-negative captions (extra columns)
        neg_MD = all_gather_with_grad(neg_txt_BKD.reshape(-1, neg_txt_BKD.shape[-1]), group)
        logits_i2t_BN = torch.cat([logits_i2t_BN, logit_scale * img_BD @ neg_MD.T], dim=1)
    logits_t2i_BN = logit_scale * txt_BD @ img_ND.T
    loss_i2t = F.cross_entropy(logits_i2t_BN, labels_B, label_smoothing=label_smoothing)
    loss_t2i = F.cross_entropy(logits_t2i_BN, labels_B, label_smoothing=label_smoothing)
    return (loss_i2t + loss_t2i) / 2


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    group=None,
    impl: str = "gather",
    neg_text_features: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    Args:
        image_features, text_features: this rank's L2-normalised features, B x D.
        logit_scale: the multiplier (exp of the learned log-temperature), scalar.
        group: process group (None: the default group if initialised, else single process).
        impl: ``"gather"`` (all-gather with gradients, B x N logits per rank).
        neg_text_features: B x K x D hard-negative captions (sample-major), extra columns of the
            image->text direction for every image.
        label_smoothing: cross-entropy label smoothing.

    Returns:
        Scalar loss, identical on every rank (see the module docstring for the gradient).

    Raises:
        ValueError: unknown ``impl`` or mismatched shapes.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown contrastive impl '{impl}'; choose one of {', '.join(IMPLS)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} differ")
    local = _gather_infonce(image_features, text_features, logit_scale, group, neg_text_features, label_smoothing)
    _, world = group_rank_world(group)
    if world == 1:
        return local
    # value: the global mean; gradient: this rank's rows only (DDP averages over ranks)
    return local + (mean_over_ranks(local, group) - local.detach())
