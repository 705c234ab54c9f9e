"""SigLIP's pairwise sigmoid loss, exact across ranks: gather, or a ring that never holds more
than one B x B block of logits.

Legend: B = this rank's batch, N = global batch, D = feature dim, K = hard negatives per image.

Per rank: loss_r = -(1/B) sum_{i in rank} sum_j log sigmoid(z_ij (s * img_i . txt_j + b)), z = +1
for the matching pair and -1 otherwise (hard-negative captions are extra columns with z = -1).
Every rank returns the mean over ranks (= the single-process loss on the global batch); the
gradient convention is clip_loss's.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from vlp.losses.distributed import all_gather_with_grad, group_rank_world, mean_over_ranks

IMPLS = ("gather", "ring")


def _block_loss(img_BD, txt_MD, scale, bias, positive_offset: int | None):
    logits_BM = scale * img_BD @ txt_MD.T + bias
    z_BM = -torch.ones_like(logits_BM)
    if positive_offset is not None:
        rows = torch.arange(img_BD.shape[0], device=img_BD.device)
        z_BM[rows, rows + positive_offset] = 1.0
    return -F.logsigmoid(z_BM * logits_BM).sum()


class _RingShift(torch.autograd.Function):
    """Send to the next rank, receive from the previous; gradients travel the other way."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return _exchange(x, group, step=1)

    @staticmethod
    def backward(ctx, grad):
        return _exchange(grad.contiguous(), ctx.group, step=-1), None


def _exchange(x, group, step: int):
    rank, world = group_rank_world(group)
    to = dist.get_global_rank(group, (rank + step) % world) if group is not None else (rank + step) % world
    frm = dist.get_global_rank(group, (rank - step) % world) if group is not None else (rank - step) % world
    out = torch.empty_like(x)
    ops = [dist.P2POp(dist.isend, x.contiguous(), to, group), dist.P2POp(dist.irecv, out, frm, group)]
    for req in dist.batch_isend_irecv(ops):
        req.wait()
    return out


def _ring(img_BD, txt_BD, scale, bias, group):
    rank, world = group_rank_world(group)
    total = 0.0
    block = txt_BD
    for step in range(world):
        # only the inputs of each block are kept for backward; its B x B logits are recomputed
        total = total + checkpoint(
            _block_loss, img_BD, block, scale, bias, 0 if step == 0 else None, use_reentrant=False
        )
        if step < world - 1:
            block = _RingShift.apply(block, group)
    return total


def siglip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    logit_bias: torch.Tensor | float,
    *,
    group=None,
    impl: str = "gather",
    neg_text_features: torch.Tensor | None = None,
) -> torch.Tensor:
    """Sigmoid loss over the global batch; arguments as :func:`vlp.losses.clip_loss` plus the bias.

    Raises:
        ValueError: unknown ``impl`` or mismatched shapes.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown siglip impl '{impl}'; choose one of {', '.join(IMPLS)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} differ")
    rank, world = group_rank_world(group)
    B = image_features.shape[0]
    if impl == "gather" or world == 1:
        txt_ND = all_gather_with_grad(text_features, group)
        total = _block_loss(image_features, txt_ND, logit_scale, logit_bias, rank * B)
    else:
        total = _ring(image_features, text_features, logit_scale, logit_bias, group)
    if neg_text_features is not None:
        neg_MD = all_gather_with_grad(neg_text_features.reshape(-1, neg_text_features.shape[-1]), group)
        total = total + _block_loss(image_features, neg_MD, logit_scale, logit_bias, None)
    local = total / B
    if world == 1:
        return local
    return local + (mean_over_ranks(local, group) - local.detach())
