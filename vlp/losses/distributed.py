"""Collectives with exact gradients, on an explicit process group (gloo or nccl).

Legend: B = this rank's batch, N = global batch (W * B), D = feature dim.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def group_rank_world(group=None) -> tuple[int, int]:
    """(rank, world size) within ``group``; (0, 1) when torch.distributed is not initialised."""
    if not (dist.is_available() and dist.is_initialized()):
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


class _AllGather(torch.autograd.Function):
    """Concatenate every rank's ``x_BD`` along dim 0; the backward returns to each rank the sum,
    over all ranks, of the gradient with respect to its slice (what the global loss needs)."""

    @staticmethod
    def forward(ctx, x_BD, group):
        ctx.group = group
        ctx.rank, world = dist.get_rank(group), dist.get_world_size(group)
        parts = [torch.empty_like(x_BD) for _ in range(world)]
        dist.all_gather(parts, x_BD.contiguous(), group=group)
        ctx.batch = x_BD.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad_ND):
        grad_ND = grad_ND.contiguous()
        if dist.get_backend(ctx.group) == dist.Backend.NCCL:
            out = torch.empty_like(grad_ND[: ctx.batch])
            dist.reduce_scatter_tensor(out, grad_ND, op=dist.ReduceOp.SUM, group=ctx.group)
            return out, None
        # gloo has no reduce-scatter: all-reduce the whole gradient and keep this rank's rows
        dist.all_reduce(grad_ND, op=dist.ReduceOp.SUM, group=ctx.group)
        start = ctx.rank * ctx.batch
        return grad_ND[start : start + ctx.batch].clone(), None


def all_gather_with_grad(x_BD: torch.Tensor, group=None) -> torch.Tensor:
    """``cat([x of every rank])`` (N x ...) with exact gradients; identity on one process."""
    _, world = group_rank_world(group)
    if world == 1:
        return x_BD
    return _AllGather.apply(x_BD, group)


def check_same_batch(x_BD: torch.Tensor, group=None, device=None) -> None:
    """All-gather needs equal shapes on every rank; a mismatch would hang or corrupt silently.
    ``device``: where the collective runs (a CUDA device for nccl), default ``x_BD``'s."""
    _, world = group_rank_world(group)
    if world == 1:
        return
    shape = torch.tensor(list(x_BD.shape), dtype=torch.long, device=device or x_BD.device)
    shapes = [torch.empty_like(shape) for _ in range(world)]
    dist.all_gather(shapes, shape, group=group)
    if any(not torch.equal(s, shapes[0]) for s in shapes):
        raise RuntimeError(f"ranks have different feature shapes: {[s.tolist() for s in shapes]}")


def mean_over_ranks(value: torch.Tensor, group=None) -> torch.Tensor:
    """The mean of a scalar over ranks, as a detached tensor."""
    _, world = group_rank_world(group)
    if world == 1:
        return value.detach()
    v = value.detach().clone()
    dist.all_reduce(v, op=dist.ReduceOp.SUM, group=group)
    return v / world
