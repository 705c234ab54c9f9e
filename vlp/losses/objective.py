"""The training objective: a weighted sum of loss terms computed from model outputs."""

from __future__ import annotations

import torch

from vlp.losses.contrastive import clip_loss


class Objective:
    """``objective(outputs, group) -> (total, {term: value})``.

    Built from ``cfg.loss``; each term reads what it needs from the model's output dict
    (``image_features``, ``text_features``, ``logit_scale``, ...). Terms marked *global* span
    the whole (gathered, accumulated) batch; the trainer's exact accumulation relies on it.
    """

    def __init__(self, loss_cfg):
        self.cfg = loss_cfg

    def __call__(self, out: dict, group=None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.cfg.contrastive
        terms = {
            "contrastive": clip_loss(
                out["image_features"],
                out["text_features"],
                out["logit_scale"],
                group=group,
                impl=c.impl,
                neg_text_features=out.get("neg_text_features"),
                label_smoothing=c.label_smoothing,
            )
        }
        weights = {"contrastive": c.weight}
        total = sum(weights[k] * v for k, v in terms.items())
        return total, terms
