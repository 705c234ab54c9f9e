"""Feature extraction over an evaluation stream (one pass, no augmentation)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm import tqdm


@dataclass
class EvalFeatures:
    """Everything the eval tasks need from one pass over the data (N samples)."""

    image_ND: torch.Tensor
    text_ND: torch.Tensor
    captions: list[str]
    meta: list[dict]
    skipped: dict[str, int] = field(default_factory=dict)


@torch.no_grad()
def extract_features(model, loader, device, max_samples: int = 0, desc: str = "eval features") -> EvalFeatures:
    """Run ``model.encode_image`` / ``encode_text`` over ``loader`` (a finite StreamLoader)."""
    model.eval()
    imgs, txts, caps, meta = [], [], [], []
    n = 0
    bar = tqdm(desc=desc, unit="img", disable=None, leave=False)
    for batch in loader:
        imgs.append(model.encode_image(batch["image"].to(device)).float().cpu())
        txts.append(model.encode_text(batch["text"].to(device)).float().cpu())
        caps += batch["caption"]
        meta += batch["json"]
        n += len(batch["caption"])
        bar.update(len(batch["caption"]))
        if max_samples and n >= max_samples:
            break
    bar.close()
    if not imgs:
        raise ValueError("the evaluation data yielded no valid samples")
    feats = EvalFeatures(torch.cat(imgs), torch.cat(txts), caps, meta, dict(loader.skipped))
    if max_samples:
        feats.image_ND, feats.text_ND = feats.image_ND[:max_samples], feats.text_ND[:max_samples]
        feats.captions, feats.meta = feats.captions[:max_samples], feats.meta[:max_samples]
    return feats
