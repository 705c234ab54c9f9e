"""The training objective: a weighted sum of loss terms computed from model outputs."""

from __future__ import annotations

import torch

from vlp.losses.contrastive import clip_loss
from vlp.losses.regularizers import alignment_loss, uniformity_loss
from vlp.losses.siglip import siglip_loss


class Objective:
    """``objective(outputs, group) -> (total, {term: value})``.

    Built from ``cfg.loss``; each term reads what it needs from the model's output dict
    (``image_features``, ``text_features``, ``logit_scale``, ``logit_bias``, ...). Every term
    here spans the whole (gathered, accumulated) batch; the trainer's exact accumulation
    relies on it.
    """

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def __call__(self, out: dict, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c, img, txt = self.cfg.contrastive, out["image_features"], out["text_features"]
        neg = out.get("neg_text_features")
        if c.type == "siglip":
            if out.get("logit_bias") is None:
                raise ValueError("loss.contrastive.type=siglip needs a model with a logit bias (e.g. debug-siglip)")
            con = siglip_loss(
                img, txt, out["logit_scale"], out["logit_bias"], group=group, impl=c.impl, neg_text_features=neg
            )
        else:
            con = clip_loss(
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
        terms, weights = {"contrastive": con}, {"contrastive": c.weight}
        if self.cfg.align_weight:
            terms["align"], weights["align"] = alignment_loss(img, txt, group=group), self.cfg.align_weight
        if self.cfg.uniform_weight:
            t = self.cfg.uniform_t
            both = (uniformity_loss(img, t=t, group=group) + uniformity_loss(txt, t=t, group=group)) / 2
            terms["uniform"], weights["uniform"] = both, self.cfg.uniform_weight
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms
