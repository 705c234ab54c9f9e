"""Extra captions of each sample (hard negatives, counting counterfactuals), encoded in the forward.

Under DDP every parameter use must happen inside the wrapped module's ``forward``, so the extra
captions go through :class:`ExtraTexts` rather than a second call to ``encode_text`` outside it.
The wrapped model keeps its own module tree: checkpoints save ``model``, not this wrapper.

Legend: B batch, K negatives per sample, L tokens, D embedding width.
"""

from __future__ import annotations

import torch

EXTRA_KEYS = ("text_neg", "text_cf", "has_cf", "pair_id")  # batch fields passed to the forward


class ExtraTexts(torch.nn.Module):
    """``forward(image, text, text_neg=None, text_cf=None, has_cf=None, pair_id=None)``: the model's
    outputs plus ``neg_text_features`` (B x K x D, sample-major) and ``cf_text_features`` (B x D),
    L2-normalised like ``text_features``, and the per-sample ``has_cf`` and ``pair_id`` (B)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, image, text, text_neg=None, text_cf=None, has_cf=None, pair_id=None):
        out = self.model(image, text)
        if pair_id is not None:
            out["pair_id"] = pair_id
        if text_neg is not None:
            b, k, length = text_neg.shape
            out["neg_text_features"] = self.model.encode_text(text_neg.reshape(b * k, length)).view(b, k, -1)
        if text_cf is not None:
            if has_cf is None:
                raise ValueError("text_cf needs has_cf (which samples have a counterfactual)")
            out["cf_text_features"] = self.model.encode_text(text_cf)
            out["has_cf"] = has_cf
        return out
