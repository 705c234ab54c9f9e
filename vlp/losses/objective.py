"""The training objective: a weighted sum of loss terms computed from model outputs."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from vlp.losses.contrastive import clip_loss
from vlp.losses.hard_negatives import counting_loss, image_grounded_loss, pair_loss, text_grounded_loss
from vlp.losses.itm import itm_loss
from vlp.losses.regularizers import alignment_loss, uniformity_loss
from vlp.losses.siglip import siglip_loss


class Objective:
    """``objective(outputs, group) -> (total, {term: value})``.

    Built from ``cfg.loss``; each term reads what it needs from the model's output dict
    (``image_features``, ``text_features``, ``logit_scale``, ``logit_bias``, ``logits`` and
    ``labels`` of CoCa, ``teacher_*`` features of the momentum teacher). Two kinds of term:

    - **global** terms (contrastive or distilled contrastive, regularisers) span the whole
      gathered and accumulated batch: the trainer's exact accumulation computes them once on
      the cached features of every micro-batch (:meth:`global_terms`);
    - **local** terms (CoCa's captioning cross-entropy) are means over one micro-batch's tokens
      and accumulate per micro-batch, weighted by its share of the tokens (:meth:`local_terms`,
      :meth:`local_weights`), so the sum is the mean over all tokens of the step. Across ranks it
      is the mean of the ranks' token means (DDP averages their gradients).
    """

    # outputs only local terms read: never cached across micro-batches (caption logits are B x L x V)
    LOCAL_KEYS = ("logits", "labels", "itm_logits", "itm_labels")

    def __init__(self, loss_cfg, teacher=None):
        self.cfg, self.teacher = loss_cfg, teacher
        self.alpha = 0.0  # distillation weight of the teacher's targets; the trainer sets it each step

    def __call__(self, out: dict, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = self.global_terms(out, group)
        for name, (value, weight) in self.local_terms(out).items():
            total, terms[name] = total + weight * value, value
        return total, terms

    def global_terms(self, out: dict, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        terms, weights = {"contrastive": self._contrastive(out, group)}, {"contrastive": self.cfg.contrastive.weight}
        img, txt = out["image_features"], out["text_features"]
        if self.cfg.align_weight:
            terms["align"], weights["align"] = alignment_loss(img, txt, group=group), self.cfg.align_weight
        if self.cfg.uniform_weight:
            t = self.cfg.uniform_t
            both = (uniformity_loss(img, t=t, group=group) + uniformity_loss(txt, t=t, group=group)) / 2
            terms["uniform"], weights["uniform"] = both, self.cfg.uniform_weight
        for name, (value, weight) in self._generated_caption_terms(out, group).items():
            terms[name], weights[name] = value, weight
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms

    def _generated_caption_terms(self, out: dict, group) -> dict[str, tuple[torch.Tensor, float]]:
        """DeGLA's grounded contrasts on hard negatives, the counting loss on counterfactuals and the
        minimal-pair loss."""
        n, terms = self.cfg.negatives, {}
        img, txt, neg, scale = (
            out["image_features"],
            out["text_features"],
            out.get("neg_text_features"),
            out["logit_scale"],
        )
        if neg is not None and n.image_grounded_weight:
            terms["image_grounded"] = (image_grounded_loss(img, txt, neg, scale, group), n.image_grounded_weight)
        if neg is not None and n.text_grounded_weight:
            if "teacher_text_features" not in out:
                raise ValueError("loss.negatives.text_grounded_weight needs the momentum teacher's text features")
            tgc = text_grounded_loss(txt, out["teacher_text_features"], neg, n.text_grounded_scale, group)
            terms["text_grounded"] = (tgc, n.text_grounded_weight)
        if out.get("cf_text_features") is not None and self.cfg.counting_weight:
            cnt = counting_loss(img, txt, out["cf_text_features"], out["has_cf"], scale, group)
            terms["counting"] = (cnt, self.cfg.counting_weight)
        if out.get("pair_id") is not None and self.cfg.pair_weight:
            terms["pair"] = (pair_loss(img, txt, out["pair_id"], scale, group), self.cfg.pair_weight)
        return terms

    def local_terms(self, out: dict) -> dict[str, tuple[torch.Tensor, float]]:
        """``{name: (value, weight)}`` of this micro-batch: CoCa's captioning loss (for models with
        ``logits``) and the image-text matching loss (models with an ITM head, in training)."""
        terms = {}
        if out.get("logits") is not None and self.cfg.caption_weight:
            terms["caption"] = (caption_loss(out["logits"], out["labels"]), self.cfg.caption_weight)
        if out.get("itm_logits") is not None and self.cfg.itm_weight:
            terms["itm"] = (itm_loss(out["itm_logits"], out["itm_labels"]), self.cfg.itm_weight)
        return terms

    def local_weights(self, out: dict) -> dict[str, float]:
        """How many items each local term of ``out`` averages over (caption: label tokens; ITM:
        pairs), so that micro-batches combine into the mean over all of them."""
        weights = {}
        if out.get("labels") is not None:  # a tensor on the device: reading it would be a host sync
            logits = out.get("logits")  # counts stay exact: in the loss's own precision (float64 in tests)
            dtype = logits.dtype if logits is not None and logits.dtype == torch.float64 else torch.float32
            weights["caption"] = (out["labels"] != PAD_ID).sum().to(dtype)
        if out.get("itm_labels") is not None:
            weights["itm"] = float(out["itm_labels"].numel())
        return weights

    def _contrastive(self, out: dict, group) -> torch.Tensor:
        c, img, txt = self.cfg.contrastive, out["image_features"], out["text_features"]
        neg = out.get("neg_text_features") if self.cfg.negatives.columns else None
        if self.cfg.distill.enabled:
            if self.teacher is None or "teacher_image_features" not in out:
                raise ValueError("loss.distill.enabled needs the momentum teacher's features in the outputs")
            from vlp.losses.distill import distilled_clip_loss

            queue_img, queue_txt = self.teacher.queue()
            return distilled_clip_loss(
                img,
                txt,
                out["logit_scale"],
                out["teacher_image_features"],
                out["teacher_text_features"],
                alpha=self.alpha,
                queue_image=queue_img,
                queue_text=queue_txt,
                group=group,
            )
        if c.type == "siglip":
            if out.get("logit_bias") is None:
                raise ValueError("loss.contrastive.type=siglip needs a model with a logit bias (e.g. debug-siglip)")
            return siglip_loss(
                img, txt, out["logit_scale"], out["logit_bias"], group=group, impl=c.impl, neg_text_features=neg
            )
        return clip_loss(
            img,
            txt,
            out["logit_scale"],
            group=group,
            impl=c.impl,
            neg_text_features=neg,
            own_negatives=c.own_negatives,
            label_smoothing=c.label_smoothing,
            dcl=c.dcl,
            tile_size=c.tile_size,
            group_size=c.group_size,
        )


PAD_ID = 0  # open_clip's tokenizers pad with 0; CoCa's ``labels`` are the caption tokens after the first


def caption_loss(logits_BLV: torch.Tensor, labels_BL: torch.Tensor, pad_id: int = PAD_ID) -> torch.Tensor:
    """Teacher-forced captioning cross-entropy: mean over the non-padding label tokens.

    ``logits_BLV`` predicts ``labels_BL`` position by position (CoCa's output); padding positions
    are ignored. Raises ValueError when no label token is left, for CPU tensors; on an accelerator
    that check would be a host sync in every step, and such a batch gives a NaN loss instead.
    """
    if labels_BL.device.type == "cpu" and not bool((labels_BL != pad_id).any()):
        raise ValueError("caption_loss: every label token is padding")
    if logits_BLV.dtype in (torch.float16, torch.bfloat16):
        logits_BLV = logits_BLV.float()
    return F.cross_entropy(logits_BLV.flatten(0, 1), labels_BL.flatten(), ignore_index=pad_id)
