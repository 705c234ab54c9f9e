"""Losses on generated captions: DeGLA's image- and text-grounded contrasts, the counting loss, and
the minimal-pair (or group) loss on counterfactual images.

Legend: B = this rank's batch, K = hard negatives per sample, D = feature dim, M = B * K.

**The one layout of hard negatives.** A batch's negatives are ``neg_BKD``: sample-major, row b
holds sample b's K negatives. Flattened to columns (``neg_BKD.reshape(M, D)``), negative k of
sample b is column :func:`negative_columns` ``[b, k] = b * K + k``; every mask below is built from
that function and nothing else. (DeGLA's released loss builds its text-grounded mask with
``repeat`` — the negatives of one sample spread across the row, i.e. type-major — and its
image-grounded mask with ``repeat_interleave`` — sample-major — so one of the two scores the wrong
negatives; the tests check both of ours against a per-sample reference.)

Each loss here is a mean over samples; as in :mod:`vlp.losses.contrastive`, every rank returns the
global value and differentiates only its own rows, so DDP's gradient mean gives the single-process
gradient of the whole batch.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.data.extra_captions import PAIR_GROUP_LIMIT
from vlp.losses.distributed import group_rank_world, mean_over_ranks


def negative_columns(batch: int, k: int, device=None) -> torch.Tensor:
    """B x K: the flat column of each sample's negatives (sample-major: ``b * K + k``)."""
    return torch.arange(batch * k, device=device).view(batch, k)


def own_negatives_mask(batch: int, k: int, device=None) -> torch.Tensor:
    """B x M bool: True where column j is one of row b's own negatives."""
    mask = torch.zeros(batch, batch * k, dtype=torch.bool, device=device)
    mask.scatter_(1, negative_columns(batch, k, device), True)
    return mask


def _global_mean(local_mean: torch.Tensor, group) -> torch.Tensor:
    """Value: the mean over ranks (equal batches); gradient: this rank's rows."""
    _, world = group_rank_world(group)
    return local_mean if world == 1 else local_mean + (mean_over_ranks(local_mean, group) - local_mean.detach())


def _own_columns_ce(rows_BD, first_BD, neg_BKD, scale) -> torch.Tensor:
    """Per row b: cross-entropy of [row . first_b, row . own negatives of b] with target 0, computed
    over all flat columns with the masks of the layout (B x (B + M) logits)."""
    b, k, _ = neg_BKD.shape
    cols = torch.cat([first_BD, neg_BKD.reshape(b * k, -1)])
    logits = scale * rows_BD @ cols.T
    allowed = torch.cat(
        [torch.eye(b, dtype=torch.bool, device=rows_BD.device), own_negatives_mask(b, k, rows_BD.device)], 1
    )
    logits = logits.masked_fill(~allowed, float("-inf"))
    return F.cross_entropy(logits, torch.arange(b, device=rows_BD.device))


def image_grounded_loss(image_BD, text_BD, neg_BKD, logit_scale, group=None) -> torch.Tensor:
    """DeGLA's image-grounded contrast: each image against its caption and its own K negatives
    (no other sample's captions). Features L2-normalised; raises ValueError on shape mismatch."""
    _check(image_BD, text_BD, neg_BKD)
    return _global_mean(_own_columns_ce(image_BD, text_BD, neg_BKD, logit_scale), group)


def text_grounded_loss(text_BD, teacher_text_BD, neg_BKD, scale: float = 10.0, group=None) -> torch.Tensor:
    """DeGLA's text-grounded contrast: each caption's embedding against the EMA teacher's embedding
    of the same caption (the positive, no gradient) and the model's embeddings of its own K
    negatives, at a fixed ``scale`` (DeGLA: 10)."""
    _check(text_BD, teacher_text_BD, neg_BKD)
    return _global_mean(_own_columns_ce(text_BD, teacher_text_BD.detach(), neg_BKD, scale), group)


def counting_loss(image_BD, text_BD, cf_text_BD, has_cf_B, logit_scale, group=None) -> torch.Tensor:
    """Paiss et al.'s counting loss, mean over the samples with a counterfactual:

        L = -log( exp(s(I, T)) / (exp(s(I, T)) + exp(s(I, T_cf))) ) = softplus(s(I, T_cf) - s(I, T))

    with s = logit scale x cosine. The mean is over every rank's samples with ``has_cf`` (their
    number may differ between ranks); 0 when no sample has one.
    """
    _check(image_BD, text_BD, cf_text_BD.unsqueeze(1))
    per_B = F.softplus(logit_scale * ((image_BD * cf_text_BD).sum(-1) - (image_BD * text_BD).sum(-1)))
    return _masked_global_mean(per_B, has_cf_B, group)


def pair_groups(pair_id_B: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B x B same group, has a group) per row: rows with the same non-negative id make a minimal
    pair or group when there are 2 to PAIR_GROUP_LIMIT of them (an id on more rows is a bad id:
    none of them has a group). ``same`` is True on the diagonal of rows with a group."""
    same = (pair_id_B[:, None] == pair_id_B[None, :]) & (pair_id_B[:, None] >= 0)
    size = same.sum(1)
    has = (size >= 2) & (size <= PAIR_GROUP_LIMIT)
    return same & has[:, None], has


def pair_loss(image_BD, text_BD, pair_id_B, logit_scale, group=None) -> torch.Tensor:
    """Minimal-pair (or group) loss, mean over the rows with a group G(b) (:func:`pair_groups`):

        -log softmax_{c in G(b)} s(I_b, T_c) [b]  -  log softmax_{c in G(b)} s(I_c, T_b) [b]

    the image against its caption and the other members' captions, and the caption against its
    image and the other members' images, with s = logit scale x cosine. For a pair {b, p} this is
    softplus(s(I_b, T_p) - s(I_b, T_b)) + softplus(s(I_p, T_b) - s(I_b, T_b)). Groups are rows of this
    rank's batch; the mean is over every rank's rows with one (0 when none has).
    """
    _check(image_BD, text_BD, text_BD.unsqueeze(1))
    if pair_id_B.shape != image_BD.shape[:1]:
        raise ValueError(f"pair_id has shape {tuple(pair_id_B.shape)}, expected ({image_BD.shape[0]},)")
    same, has = pair_groups(pair_id_B)
    eye = torch.eye(len(same), dtype=torch.bool, device=same.device)
    logits = (logit_scale * image_BD @ text_BD.t()).masked_fill(~(same | eye), float("-inf"))
    positive = logits.diagonal()
    per_B = (logits.logsumexp(1) - positive) + (logits.logsumexp(0) - positive)
    return _masked_global_mean(per_B, has, group)


def _masked_global_mean(per_B: torch.Tensor, mask_B: torch.Tensor, group) -> torch.Tensor:
    """Mean of ``per_B`` over every rank's rows where ``mask_B`` (counts may differ between ranks)."""
    mask = mask_B.to(per_B.dtype)
    local_sum = (per_B * mask).sum()
    _, world = group_rank_world(group)
    totals = torch.stack([local_sum.detach(), mask.sum()])
    if world > 1:
        dist.all_reduce(totals, group=group)
    count = totals[1].clamp(min=1.0)
    # gradient: W x this rank's share, so that DDP's mean over ranks is the global mean's gradient
    local = world * local_sum / count
    return local + (totals[0] / count - local.detach())


def _check(rows_BD, first_BD, neg_BKD) -> None:
    if rows_BD.dim() != 2 or rows_BD.shape != first_BD.shape:
        raise ValueError(f"features must be B x D alike, got {tuple(rows_BD.shape)} and {tuple(first_BD.shape)}")
    if neg_BKD.dim() != 3 or neg_BKD.shape[0] != rows_BD.shape[0] or neg_BKD.shape[2] != rows_BD.shape[1]:
        raise ValueError(f"negatives must be B x K x D (sample-major), got {tuple(neg_BKD.shape)}")
