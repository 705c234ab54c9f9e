"""Alignment and uniformity of features (Wang & Isola, 2020), exact across ranks.

Legend: B = this rank's batch, N = global batch, D = feature dim.

    align   = mean_i ||x_i - y_i||^2
    uniform = log mean_{i != j} exp(-t ||x_i - x_j||^2)   over all N (N - 1) ordered pairs

Both return the global value on every rank with clip_loss's gradient convention. ``uniform``
is not a mean of per-rank terms (a log of a global mean), so each rank differentiates
``W * S_r / S`` where S_r is its rows' share of the pair sum S: after DDP's mean this is
d log S. Memory: B x N pair distances per rank.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlp.losses.distributed import all_gather_with_grad, group_rank_world, mean_over_ranks


def alignment_loss(x_BD: torch.Tensor, y_BD: torch.Tensor, *, group=None) -> torch.Tensor:
    local = (x_BD - y_BD).pow(2).sum(-1).mean()
    _, world = group_rank_world(group)
    return local if world == 1 else local + (mean_over_ranks(local, group) - local.detach())


def uniformity_loss(x_BD: torch.Tensor, *, t: float = 2.0, group=None) -> torch.Tensor:
    rank, world = group_rank_world(group)
    B = x_BD.shape[0]
    x_ND = all_gather_with_grad(x_BD, group)
    n = x_ND.shape[0]
    sq_BN = (x_BD.pow(2).sum(-1, keepdim=True) + x_ND.pow(2).sum(-1) - 2 * x_BD @ x_ND.T).clamp_min(0)
    kernel_BN = torch.exp(-t * sq_BN)
    rows = torch.arange(B, device=x_BD.device)
    kernel_BN = kernel_BN.index_put((rows, rows + rank * B), torch.zeros(B, dtype=kernel_BN.dtype))
    share = kernel_BN.sum()
    total = share.detach().clone()
    if world > 1:
        dist.all_reduce(total, group=group)
    value = torch.log(total / (n * (n - 1)))
    surrogate = world * share / total
    return value + (surrogate - surrogate.detach())
