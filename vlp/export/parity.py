"""Parity of an export with its source: the same inputs through both models, max abs differences.

Inputs are a fixed batch: seeded Gaussian pixels (the range of normalised images) at the model's
resolution and a few captions tokenized by the model's own tokenizer. Features are compared after
L2 normalisation (vlp's contract: what retrieval and zero-shot use) and, where the target exposes
them, before it (the raw projections), plus the logit scale (the multiplier, exp of the parameter).

Legend: B batch, S image side, L context length, D embedding width.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vlp.export.errors import ExportError

TOLERANCE = 1e-4  # float32 reorderings between implementations stay far below this
CAPTIONS = (
    "a photo of a cat",
    "two red squares to the left of a blue circle",
    "A DOG, sleeping on the sofa!",
)


@dataclass
class ParityBatch:
    """Fixed inputs and the source model's outputs on them (computed once per export)."""

    pixels_BCSS: torch.Tensor
    text_BL: torch.Tensor
    captions: tuple[str, ...]
    reference: dict[str, torch.Tensor]


def parity_batch(source, batch: int = 2, captions: tuple[str, ...] = CAPTIONS, seed: int = 0) -> ParityBatch:
    """``batch`` seeded images at the source's resolution, ``captions`` as its token ids, its features."""
    from vlp.models.registry import image_size
    from vlp.models.tokenizer import get_tokenizer

    size = image_size(source.model)
    generator = torch.Generator().manual_seed(seed)
    pixels_BCSS = torch.randn(batch, 3, size, size, generator=generator)
    text_BL = get_tokenizer(source.model_cfg)(list(captions))
    reference = model_features(source.model, pixels_BCSS, text_BL)
    return ParityBatch(pixels_BCSS, text_BL, tuple(captions), reference)


@torch.no_grad()
def model_features(model, pixels_BCSS: torch.Tensor, text_BL: torch.Tensor) -> dict[str, torch.Tensor]:
    """An open_clip-style model's raw features (``image``, ``text``: B x D) and ``logit_scale``
    (the multiplier)."""
    return {
        "image": model.encode_image(pixels_BCSS, normalize=False),
        "text": model.encode_text(text_BL, normalize=False),
        "logit_scale": model.logit_scale.exp().reshape(()),
    }


def compare(reference: dict, candidate: dict, raw: bool) -> dict[str, float]:
    """Max abs differences of normalised features (and raw ones when ``raw``) and of the logit scale."""
    diffs = {}
    for key in ("image", "text"):
        ref, cand = reference[key].float(), candidate[key].float()
        if ref.shape != cand.shape:
            raise ExportError(f"{key} features: source {tuple(ref.shape)} but export {tuple(cand.shape)}")
        diffs[f"{key}_features"] = _max_abs(F.normalize(ref, dim=-1), F.normalize(cand, dim=-1))
        if raw:
            diffs[f"{key}_features_raw"] = _max_abs(ref, cand)
    diffs["logit_scale"] = _max_abs(reference["logit_scale"], candidate["logit_scale"].reshape(()))
    return diffs


def summarize(diffs: dict[str, float], **flags: bool) -> dict:
    """``diffs`` and ``flags`` (e.g. ``tokenizer_ids_equal``) plus ``max_abs_diff``, the largest
    difference of normalised features and logit scale, and ``ok``: that is within
    :data:`TOLERANCE` and every flag holds. Raw-feature differences are reported, not judged: they
    grow with the features' norms, which training leaves unconstrained."""
    worst = max(v for k, v in diffs.items() if not k.endswith("_raw"))
    return {**diffs, **flags, "max_abs_diff": worst, "ok": worst <= TOLERANCE and all(flags.values())}


def _max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())
