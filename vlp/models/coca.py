"""vlp's forward for open_clip CoCa models: the same outputs, less work, and the ITM pairs.

open_clip's ``CoCa.forward`` runs the multimodal decoder over the whole context (76 tokens for
``coca_ViT-B-32``) and projects every position to the 49,408-token vocabulary, though captions
are mostly padding. The decoder is causal (and cross-attends only to the image), so its outputs at
the positions before the batch's longest caption ends do not depend on the padding after it: vlp
cuts those columns before the decoder. ``logits`` / ``labels`` are then B x L' (L' = the longest
caption's length - 1) instead of B x (context - 1); the captioning loss, which ignores padding, is
unchanged, and a batch of short captions costs a fraction of the vocabulary projection.

The class is swapped on the instance (like :func:`vlp.models.registry.normalized_by_default`), so
the module tree and state dict stay open_clip's.
"""

from __future__ import annotations

import torch

from vlp.models.itm import itm_outputs


class _VlpCoCa:
    def forward(self, image, text=None, image_latent=None, image_embs=None, output_labels=True):
        if text is None or not output_labels:
            return super().forward(image, text, image_latent, image_embs, output_labels)
        if image_latent is None or image_embs is None:
            image_latent, image_embs = self._encode_image(image)
        text_latent, token_embs = self._encode_text(text)
        pad = getattr(self, "pad_id", 0)
        # positions up to the longest caption's end-of-text; the text tower saw the whole context
        n = max(int((text != pad).sum(1).max()) - 1, 1)
        logits = self.text_decoder(image_embs, token_embs[:, :n])
        out = {
            "image_features": image_latent,
            "text_features": text_latent,
            "logits": logits,
            "labels": text[:, 1 : n + 1],
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        if self.training and getattr(self, "itm_head", None) is not None:
            out.update(itm_outputs(self, image_latent, text_latent, image_embs, token_embs, text))
        return out


_CLASSES: dict[type, type] = {}


def vlp_coca_forward(model: torch.nn.Module) -> torch.nn.Module:
    """Swap ``model``'s class for one whose ``forward`` is :class:`_VlpCoCa`'s (CoCa models only)."""
    cls = type(model)
    if cls not in _CLASSES:
        _CLASSES[cls] = type(cls.__name__, (_VlpCoCa, cls), {})
    model.__class__ = _CLASSES[cls]
    return model
