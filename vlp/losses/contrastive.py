"""CLIP's symmetric InfoNCE loss, exact across ranks: gather, tiled and grouped implementations.

Legend: B = this rank's batch, N = batch gathered over the (sub)group, D = feature dim,
K = hard negatives per image, C = columns of the image->text direction.

Gradient convention: every rank returns the same value (the mean over all ranks' rows) and,
after DDP's mean all-reduce of parameter gradients, the gradient equals that of the
single-process loss on the concatenated global batch (``grouped``: the mean of the per-group
losses). Each rank differentiates only its own rows; gathered features carry gradients back to
the rank that produced them.

Per row, with logits l_j = s * row . col_j, positive column t, label smoothing e, C columns:
    loss = logsumexp_j l_j - (1 - e) l_t - (e / C) sum_j l_j
which is ``F.cross_entropy(..., label_smoothing=e)``; DCL drops l_t from the log-sum-exp.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from vlp.losses.distributed import all_gather_with_grad, group_rank_world, mean_over_ranks
from vlp.losses.tiled import tiled_lse, tiled_lse_both

IMPLS = ("gather", "tiled", "grouped")


def _direction_loss(rows_BD, cols_CD, scale, targets_B, *, extra_BKD, tiled, tile, label_smoothing, dcl):
    """Mean over rows of the loss above; ``extra_BKD``: K more columns private to each row."""
    num_cols = cols_CD.shape[0] + (extra_BKD.shape[1] if extra_BKD is not None else 0)
    pos_B = scale * (rows_BD * cols_CD[targets_B]).sum(-1)
    exclude = targets_B if dcl else None
    if tiled:
        lse_B = tiled_lse(rows_BD, cols_CD, scale, extra_RKD=extra_BKD, exclude_R=exclude, tile=tile)
    else:
        logits_BC = scale * rows_BD @ cols_CD.T
        if extra_BKD is not None:
            logits_BC = torch.cat([logits_BC, scale * torch.einsum("bd,bkd->bk", rows_BD, extra_BKD)], dim=1)
        if dcl:
            mask = torch.zeros_like(logits_BC, dtype=torch.bool)
            mask[torch.arange(rows_BD.shape[0]), targets_B] = True
            logits_BC = logits_BC.masked_fill(mask, float("-inf"))
        lse_B = torch.logsumexp(logits_BC, dim=1)
    loss_B = lse_B - (1 - label_smoothing) * pos_B
    if label_smoothing:
        col_sum_D = cols_CD.sum(0) + (extra_BKD.sum(1) if extra_BKD is not None else 0)
        loss_B = loss_B - label_smoothing / num_cols * scale * (rows_BD * col_sum_D).sum(-1)
    return loss_B.mean()


def _symmetric_tiled(img_ND, txt_ND, scale, *, tile, label_smoothing, dcl):
    """One process, no hard negatives: both directions from one pass over the tiles."""
    lse_i2t, lse_t2i = tiled_lse_both(img_ND, txt_ND, scale, exclude_diag=dcl, tile=tile)
    pos_N = scale * (img_ND * txt_ND).sum(-1)
    loss = (lse_i2t + lse_t2i) / 2 - (1 - label_smoothing) * pos_N
    if label_smoothing:
        n = img_ND.shape[0]
        both = (img_ND * txt_ND.sum(0)).sum(-1) + (txt_ND * img_ND.sum(0)).sum(-1)
        loss = loss - label_smoothing / n * scale * both / 2
    return loss.mean()


def _infonce(img_BD, txt_BD, scale, group, neg_BKD, *, own_negatives, tiled, tile, label_smoothing, dcl):
    rank, world = group_rank_world(group)
    if tiled and world == 1 and neg_BKD is None:
        return _symmetric_tiled(img_BD, txt_BD, scale, tile=tile, label_smoothing=label_smoothing, dcl=dcl)
    img_ND = all_gather_with_grad(img_BD, group)
    txt_ND = all_gather_with_grad(txt_BD, group)
    targets_B = torch.arange(img_BD.shape[0], device=img_BD.device) + rank * img_BD.shape[0]
    cols_CD, extra = txt_ND, None
    if neg_BKD is not None and own_negatives:
        extra = neg_BKD  # each image against its own K negatives only
    elif neg_BKD is not None:
        # NegCLIP: every image also scores every rank's hard-negative captions (extra columns)
        cols_CD = torch.cat([txt_ND, all_gather_with_grad(neg_BKD.reshape(-1, neg_BKD.shape[-1]), group)])
    kw = dict(tiled=tiled, tile=tile, label_smoothing=label_smoothing, dcl=dcl)
    i2t = _direction_loss(img_BD, cols_CD, scale, targets_B, extra_BKD=extra, **kw)
    t2i = _direction_loss(txt_BD, img_ND, scale, targets_B, extra_BKD=None, **kw)
    return (i2t + t2i) / 2


_SUBGROUPS: dict = {}


def subgroup(group_size: int, group=None):
    """This rank's process group among consecutive blocks of ``group_size`` ranks of ``group``.

    Every rank must call it (creating process groups is collective); groups are cached.
    """
    rank, world = group_rank_world(group)
    if group_size < 1 or world % group_size:
        raise ValueError(f"loss.contrastive.group_size={group_size} must divide the world size {world}")
    if group_size == world:
        return group
    key = (id(group), group_size)
    if key not in _SUBGROUPS:
        ranks = dist.get_process_group_ranks(group) if group is not None else list(range(world))
        blocks = [ranks[i : i + group_size] for i in range(0, world, group_size)]
        made = [dist.new_group(b) for b in blocks]
        _SUBGROUPS[key] = made[rank // group_size]
    return _SUBGROUPS[key]


def clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    *,
    group=None,
    impl: str = "gather",
    neg_text_features: torch.Tensor | None = None,
    own_negatives: bool = False,
    label_smoothing: float = 0.0,
    dcl: bool = False,
    tile_size: int = 1024,
    group_size: int = 0,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch.

    Args:
        image_features, text_features: this rank's L2-normalised features, B x D.
        logit_scale: the multiplier (exp of the learned log-temperature), scalar.
        group: process group (None: the default group if initialised, else single process).
        impl: ``gather`` (all-gather with gradients, B x N logits per rank), ``tiled`` (the same
            loss streamed over tiles of ``tile_size``: O(tile^2) logits), ``grouped`` (gather
            within blocks of ``group_size`` ranks; each block is its own contrastive batch).
        neg_text_features: B x K x D hard-negative captions (sample-major): extra image->text
            columns for every image (NegCLIP), or only for their own image if ``own_negatives``.
        label_smoothing: cross-entropy label smoothing over all columns.
        dcl: decoupled contrastive loss (the positive is left out of the denominator).

    Returns:
        Scalar loss, identical on every rank (see the module docstring for the gradient).

    Raises:
        ValueError: unknown ``impl``, mismatched shapes, bad group size, dcl with label smoothing.
    """
    if impl not in IMPLS:
        raise ValueError(f"unknown contrastive impl '{impl}'; choose one of {', '.join(IMPLS)}")
    if image_features.shape != text_features.shape:
        raise ValueError(f"image {tuple(image_features.shape)} and text {tuple(text_features.shape)} differ")
    if neg_text_features is not None and neg_text_features.shape[::2] != image_features.shape:
        raise ValueError(f"neg_text_features must be B x K x D, got {tuple(neg_text_features.shape)}")
    if dcl and label_smoothing:
        raise ValueError("dcl and label_smoothing cannot be combined")
    inner = group
    if impl == "grouped":
        inner = subgroup(group_size or group_rank_world(group)[1], group)
    local = _infonce(
        image_features,
        text_features,
        logit_scale,
        inner,
        neg_text_features,
        own_negatives=own_negatives,
        tiled=impl == "tiled",
        tile=tile_size,
        label_smoothing=label_smoothing,
        dcl=dcl,
    )
    _, world = group_rank_world(group)
    if world == 1:
        return local
    # value: the mean over all ranks; gradient: this rank's rows only (DDP averages over ranks)
    return local + (mean_over_ranks(local, group) - local.detach())
