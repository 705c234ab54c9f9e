"""Image-text matching: the loss of the matching head's classifier (the head and its pairs are
built by :mod:`vlp.models.itm`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def itm_loss(logits_N2: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the matching classifier over all pairs (1 positive : 2 negatives)."""
    return F.cross_entropy(logits_N2.float() if logits_N2.dtype != torch.float64 else logits_N2, labels_N)
