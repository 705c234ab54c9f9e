"""Extra captions of each sample (hard negatives, counting counterfactuals), encoded in the forward.

Under DDP every parameter use must happen inside the wrapped module's ``forward``, so the extra
captions go through :class:`ExtraTexts` rather than a second call to ``encode_text`` outside it.
The wrapped model keeps its own module tree: checkpoints save ``model``, not this wrapper.

Legend: B batch, K negatives per sample, L tokens, D embedding width.
"""

from __future__ import annotations

import torch

EXTRA_KEYS = ("text_neg", "text_cf", "has_cf")  # batch fields passed to the forward


class ExtraTexts(torch.nn.Module):
    """``forward(image, text, text_neg=None, text_cf=None, has_cf=None)``: the model's outputs plus
    ``neg_text_features`` (B x K x D, sample-major), ``cf_text_features`` (B x D) and ``has_cf`` (B),
    L2-normalised like ``text_features``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, text, text_neg=None, text_cf=None, has_cf=None):
        out = self.model(image, text)
        if text_neg is not None:
            b, k, length = text_neg.shape
            out["neg_text_features"] = self.model.encode_text(text_neg.reshape(b * k, length)).view(b, k, -1)
        if text_cf is not None:
            if has_cf is None:
                raise ValueError("text_cf needs has_cf (which samples have a counterfactual)")
            out["cf_text_features"] = self.model.encode_text(text_cf)
            out["has_cf"] = has_cf
        return out
