"""Image-text matching (ITM) on CoCa's multimodal decoder, with hard negatives from the batch.

With ``model.itm_head`` a CoCa model gets a 2-way classifier ``itm_head`` on the decoder's state
at the caption's last token (end-of-text: the causal decoder has read the whole caption and,
through cross-attention, the image there). In training, every forward also scores 3B pairs:

    B positives (image i, caption i)                               -> label 1
    B image-anchored negatives (image i, caption j ~ p_i2t)        -> label 0
    B text-anchored negatives (image j ~ p_t2i, caption i)         -> label 0

Hard negatives as in ALBEF: ``p_i2t`` is the softmax of the in-batch similarities (logit scale
times cosine), with the positive and every caption identical to it set to probability 0 (an
identical caption is a positive, not a negative), renormalised, and sampled with one vectorised
``torch.multinomial`` per direction. ALBEF's code adds an epsilon to avoid all-zero rows in a way
that has no effect after the masking; here a row with nothing left to sample is an error.

Legend: B batch, L caption tokens, T image tokens, W decoder width.
"""

from __future__ import annotations

import torch

PAD_ID = 0


def duplicate_captions(text_BL: torch.Tensor) -> torch.Tensor:
    """B x B bool: captions i and j are the same tokens (the diagonal included)."""
    return (text_BL[:, None, :] == text_BL[None, :, :]).all(-1)


def sample_hard_negatives(sim_BB: torch.Tensor, same_BB: torch.Tensor, generator=None) -> torch.Tensor:
    """For each row i, a column j drawn with probability softmax(sim_BB[i]) over the columns
    where ``same_BB[i]`` is False. Returns LongTensor B.

    Raises ValueError for a batch of 1 or a row whose every column is masked (every caption in the
    batch equals row i's).
    """
    if sim_BB.shape[0] < 2:
        raise ValueError("image-text matching needs at least 2 samples per batch (one positive, one negative)")
    with torch.no_grad():
        if not bool(torch.isfinite(sim_BB).all()):
            raise FloatingPointError("image-text matching: non-finite similarities (the model's features diverged)")
        logits_BB = sim_BB.float().masked_fill(same_BB, float("-inf"))
        lonely = torch.isinf(logits_BB).all(1)
        if bool(lonely.any()):
            i = int(lonely.nonzero()[0])
            raise ValueError(
                f"image-text matching: sample {i} has no negative in its batch (every caption equals its "
                "own); use data.unique_captions or a larger batch"
            )
        probs_BB = torch.softmax(logits_BB, dim=1)
        return torch.multinomial(probs_BB, 1, generator=generator).squeeze(1)


def decoder_states(decoder, image_embs_BTW: torch.Tensor, token_embs_BLW: torch.Tensor) -> torch.Tensor:
    """The multimodal decoder's final states B x L x W (after its last LayerNorm, before the
    projection to the vocabulary, which is skipped)."""
    projection = decoder.text_projection
    decoder.text_projection = None
    try:
        return decoder(image_embs_BTW, token_embs_BLW)
    finally:
        decoder.text_projection = projection


def itm_outputs(model, image_latent_BD, text_latent_BD, image_embs_BTW, token_embs_BLW, text_BL) -> dict:
    """``itm_logits`` (3B x 2) and ``itm_labels`` (3B) of the pairs in the module docstring."""
    b = text_BL.shape[0]
    with torch.no_grad():
        sim_BB = model.logit_scale.exp() * image_latent_BD @ text_latent_BD.T
        same_BB = duplicate_captions(text_BL)
        neg_text_B = sample_hard_negatives(sim_BB, same_BB)
        neg_image_B = sample_hard_negatives(sim_BB.T, same_BB.T)
    images = torch.cat([image_embs_BTW, image_embs_BTW, image_embs_BTW[neg_image_B]])
    tokens = torch.cat([token_embs_BLW, token_embs_BLW[neg_text_B], token_embs_BLW])
    texts = torch.cat([text_BL, text_BL[neg_text_B], text_BL])
    states_3BLW = decoder_states(model.text_decoder, images, tokens)
    last_3B = ((texts != PAD_ID).sum(1) - 1).clamp(min=0)  # the end-of-text position
    pooled_3BW = states_3BLW[torch.arange(3 * b, device=texts.device), last_3B]
    labels = torch.zeros(3 * b, dtype=torch.long, device=texts.device)
    labels[:b] = 1
    return {"itm_logits": model.itm_head(pooled_3BW), "itm_labels": labels}


def add_itm_head(model: torch.nn.Module) -> torch.nn.Module:
    """Give a CoCa model a matching head (``itm_head``, a Linear(W, 2)); in training, vlp's CoCa
    forward (:mod:`vlp.models.coca`) then adds the matching pairs. Raises ValueError for other models."""
    decoder = getattr(model, "text_decoder", None)
    if decoder is None:
        raise ValueError("model.itm_head needs a CoCa architecture (a multimodal text decoder), e.g. coca_debug")
    model.itm_head = torch.nn.Linear(decoder.ln_final.normalized_shape[0], 2)
    return model
