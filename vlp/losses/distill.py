"""ALBEF's momentum-distilled contrastive loss: InfoNCE whose one-hot targets are mixed with a
momentum teacher's similarity distribution, with the teacher's queued features as extra columns.

Legend: B = this rank's batch, N = batch gathered over the group (W * B), D = feature dim,
K = queued teacher features per modality, C = N + K columns of each direction.

Per image row i (global index t), with student logits l_j = s * img_i . col_j over the columns
[txt_N ; queue_text_K] and teacher similarities u_j = s * t_img_i . t_col_j over [t_txt_N ; queue_text_K]:
    targets_j = alpha * softmax(u)_j + (1 - alpha) * [j == t]
    loss_i = -sum_j targets_j * log_softmax(l)_j
and symmetrically for text rows against [img_N ; queue_image_K]. The value is the mean of the two
directions over all rows. Gradient convention as in :mod:`vlp.losses.contrastive`: every rank
returns the same value and differentiates only its own rows (DDP's mean then gives the
single-process gradient of the global batch).

Unlike ALBEF, whose student rows are scored against the *teacher's* in-batch features, the
in-batch columns here are the student's own (gathered with gradients): with alpha = 0 and no
queue the loss is exactly CLIP's ``clip_loss(..., impl="gather")``.
"""

from __future__ import annotations

import torch

from vlp.losses.distributed import all_gather_with_grad, group_rank_world, mean_over_ranks


def _as_queue(queue_KD: torch.Tensor | None) -> torch.Tensor | None:
    return None if queue_KD is None or queue_KD.shape[0] == 0 else queue_KD


def _check(img_BD, txt_BD, t_img_BD, t_txt_BD, q_img_KD, q_txt_KD, alpha) -> None:
    shapes = [tuple(x.shape) for x in (img_BD, txt_BD, t_img_BD, t_txt_BD)]
    if img_BD.dim() != 2 or len(set(shapes)) != 1:
        raise ValueError(f"image, text, teacher image and teacher text features must be B x D alike, got {shapes}")
    if (q_img_KD is None) != (q_txt_KD is None):
        raise ValueError("pass both queues (queue_image and queue_text) or neither")
    if q_img_KD is not None and (
        q_img_KD.shape != q_txt_KD.shape or q_img_KD.dim() != 2 or q_img_KD.shape[1] != img_BD.shape[1]
    ):
        raise ValueError(
            f"queues must both be K x {img_BD.shape[1]}, got {tuple(q_img_KD.shape)} and {tuple(q_txt_KD.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"distillation alpha must be in [0, 1], got {alpha}")


def _columns(cols_ND: torch.Tensor, queue_KD: torch.Tensor | None) -> torch.Tensor:
    if queue_KD is None:
        return cols_ND
    return torch.cat([cols_ND, queue_KD.to(cols_ND.dtype)])


def _direction_loss(rows_BD, cols_ND, queue_KD, scale, t_rows_BD, t_cols_ND, targets_B, alpha) -> torch.Tensor:
    """Mean over this rank's rows of the soft-target cross-entropy above, split as
    ``-(1 - alpha) log_softmax(l)_t - alpha sum_j softmax(u)_j log_softmax(l)_j`` (no B x C one-hot)."""
    logp_BC = torch.log_softmax(scale * rows_BD @ _columns(cols_ND, queue_KD).T, dim=1)
    rows_B = torch.arange(rows_BD.shape[0], device=rows_BD.device)
    loss_B = -(1.0 - alpha) * logp_BC[rows_B, targets_B]
    if alpha:
        with torch.no_grad():
            t_scale = scale.detach() if torch.is_tensor(scale) else scale
            t_logits_BC = t_scale * t_rows_BD @ _columns(t_cols_ND, queue_KD).T
            soft_BC = torch.softmax(t_logits_BC, dim=1).to(logp_BC.dtype)
        loss_B = loss_B - alpha * (soft_BC * logp_BC).sum(1)
    return loss_B.mean()


def distilled_clip_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor | float,
    teacher_image_features: torch.Tensor,
    teacher_text_features: torch.Tensor,
    *,
    alpha: float,
    queue_image: torch.Tensor | None = None,
    queue_text: torch.Tensor | None = None,
    group=None,
) -> torch.Tensor:
    """Symmetric InfoNCE over the global batch plus the queues, with momentum-distilled targets.

    Args:
        image_features, text_features: this rank's L2-normalised student features, B x D (with grad).
        logit_scale: the multiplier (exp of the learned log-temperature), scalar. The teacher's
            similarities use the same (detached) multiplier: ALBEF has one temperature.
        teacher_image_features, teacher_text_features: this rank's teacher features, B x D (no grad).
        alpha: weight of the teacher's softmax in the targets, in [0, 1] (0: plain one-hot InfoNCE).
        queue_image, queue_text: K x D teacher features of earlier steps (no grad), identical on
            every rank, e.g. ``MomentumTeacher.queue()``; None or 0 rows: no extra columns.
        group: process group (None: the default group if initialised, else single process).

    Returns:
        Scalar loss, identical on every rank (gradient: this rank's rows, see the module docstring).

    Raises:
        ValueError: features not all B x D alike, one queue without the other, queues not K x D
            alike, ``alpha`` outside [0, 1].
    """
    q_img_KD, q_txt_KD = _as_queue(queue_image), _as_queue(queue_text)
    img_BD, txt_BD = image_features, text_features
    t_img_BD, t_txt_BD = teacher_image_features.detach(), teacher_text_features.detach()
    _check(img_BD, txt_BD, t_img_BD, t_txt_BD, q_img_KD, q_txt_KD, alpha)
    rank, world = group_rank_world(group)
    img_ND = all_gather_with_grad(img_BD, group)
    txt_ND = all_gather_with_grad(txt_BD, group)
    t_img_ND = t_txt_ND = None
    if alpha:  # the same collective on detached inputs: no autograd graph
        t_img_ND = all_gather_with_grad(t_img_BD, group)
        t_txt_ND = all_gather_with_grad(t_txt_BD, group)
    targets_B = torch.arange(img_BD.shape[0], device=img_BD.device) + rank * img_BD.shape[0]
    i2t = _direction_loss(img_BD, txt_ND, q_txt_KD, logit_scale, t_img_BD, t_txt_ND, targets_B, alpha)
    t2i = _direction_loss(txt_BD, img_ND, q_img_KD, logit_scale, t_txt_BD, t_img_ND, targets_B, alpha)
    local = (i2t + t2i) / 2
    if world == 1:
        return local
    # value: the mean over all ranks; gradient: this rank's rows only (DDP averages over ranks)
    return local + (mean_over_ranks(local, group) - local.detach())
