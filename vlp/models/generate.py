"""Caption generation for open_clip CoCa models: greedy search, beam search and sampling.

open_clip's own ``CoCa.generate`` needs transformers' ``BeamSearchScorer``, which transformers 5
removed, so vlp decodes by itself. There is no KV cache: every step runs the text tower and the
multimodal decoder on the whole prefix, exactly as ``CoCa.forward`` does with
``output_labels=False`` (the text tower's appended CLS token is already dropped from the token
embeddings it returns). Both towers are causal, so the logits of the last position depend on the
prefix only and re-running it is exact; captions are a few dozen tokens, so it stays cheap.

Lengths count the tokens generated after start-of-text, end-of-text included: ``max_len=30``
allows 30 new tokens, so at most 31 columns with the start token. A caption that reaches
``max_len`` without end-of-text is cut there. ``max_len`` may be at most the decoder's context
length minus one, the longest caption training sees (start-of-text + ``max_len`` tokens fill the
context). Start-of-text and the pad token are never generated: the text tower masks pad ids as
keys, so a generated pad would vanish from the prefix.

Legend: B images, K beams, R rows fed to the decoder (B or B*K), T tokens so far (start-of-text
included), S = max_len + 1 output columns at most, V vocabulary, N image tokens, D width.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SOT_ID = 49406  # open_clip's BPE tokenizer: start-of-text
EOS_ID = 49407  # and end-of-text
STRATEGIES = ("greedy", "beam", "sample")
_LOGITS_BUDGET = 2**25  # decoder logits (elements) held at once; larger batches run in row chunks


class GenerationError(ValueError):
    """A generation request that cannot run: not a CoCa model, unknown strategy, bad lengths."""


@dataclass(frozen=True)
class _Settings:
    max_len: int
    min_len: int
    num_beams: int
    top_k: int
    top_p: float
    temperature: float
    repetition_penalty: float
    length_penalty: float
    sot_id: int
    eos_id: int
    pad_id: int
    generator: torch.Generator | None


def check_captioner(model) -> None:
    """Raise GenerationError unless ``model`` is a CoCa-style captioner (open_clip's ``CoCa``:
    ``_encode_image``, ``_encode_text`` and a ``text_decoder``)."""
    if not all(hasattr(model, name) for name in ("text_decoder", "_encode_image", "_encode_text")):
        raise GenerationError(
            f"a {type(model).__name__} model has no text decoder: captioning needs a CoCa model "
            "(e.g. coca_debug, coca_ViT-B-32 or a CoCa checkpoint)"
        )


def max_caption_len(model) -> int:
    """The largest ``max_len`` the model accepts: its decoder's context length minus one."""
    check_captioner(model)
    context = getattr(model, "context_length", None)
    context = int(model.text_decoder.attn_mask.shape[0] if context is None else context)
    text_positions = getattr(model.text, "num_pos", None)  # positions of the text tower, CLS included
    if text_positions is not None:
        context = min(context, int(text_positions) - (getattr(model.text, "cls_emb", None) is not None))
    return context - 1


def _settings(model, strategy: str, **kw) -> _Settings:
    check_captioner(model)
    if strategy not in STRATEGIES:
        raise GenerationError(f"unknown generation strategy {strategy!r}; choose from {', '.join(STRATEGIES)}")
    limit = max_caption_len(model)
    if not 1 <= kw["max_len"] <= limit:
        raise GenerationError(
            f"max_len must be in [1, {limit}] (the decoder's context length - 1), got {kw['max_len']}"
        )
    if not 0 <= kw["min_len"] <= kw["max_len"]:
        raise GenerationError(f"min_len must be in [0, max_len={kw['max_len']}], got {kw['min_len']}")
    rules = {
        "num_beams": (kw["num_beams"] >= 1, ">= 1"),
        "top_k": (kw["top_k"] >= 0, ">= 0 (0: off)"),
        "top_p": (0 < kw["top_p"] <= 1, "in (0, 1] (1: off)"),
        "temperature": (kw["temperature"] > 0, "> 0"),
        "repetition_penalty": (kw["repetition_penalty"] > 0, "> 0 (1: off)"),
    }
    for name, (ok, rule) in rules.items():
        if not ok:
            raise GenerationError(f"{name} must be {rule}, got {kw[name]!r}")
    if kw["pad_id"] is None:
        kw["pad_id"] = int(getattr(model, "pad_id", 0))
    return _Settings(**kw)


def _next_logits(model, image_embs_RND: Tensor, tokens_RT: Tensor) -> Tensor:
    """Float32 logits R x V of the token after ``tokens_RT``, computed in row chunks that bound
    the decoder's R x T x V output."""
    rows = max(1, _LOGITS_BUDGET // (tokens_RT.shape[1] * model.text_decoder.text_projection.shape[-1]))
    out = []
    for start in range(0, tokens_RT.shape[0], rows):
        _, token_embs_RTD = model._encode_text(tokens_RT[start : start + rows])
        logits_RTV = model.text_decoder(image_embs_RND[start : start + rows], token_embs_RTD)
        out.append(logits_RTV[:, -1].float())
    return torch.cat(out)


def _penalise_repeats(logits_RV: Tensor, tokens_RT: Tensor, penalty: float) -> Tensor:
    """CTRL's repetition penalty (as transformers applies it): tokens already in the row have
    positive logits divided and negative ones multiplied by ``penalty``."""
    if penalty == 1.0:
        return logits_RV
    seen_RT = logits_RV.gather(1, tokens_RT)
    seen_RT = torch.where(seen_RT < 0, seen_RT * penalty, seen_RT / penalty)
    return logits_RV.scatter(1, tokens_RT, seen_RT)


def _forbid(scores_RV: Tensor, step: int, cfg: _Settings) -> Tensor:
    """-inf for start-of-text, pad, and end-of-text while ``step`` (1-based index of the token
    being chosen) is below ``min_len``."""
    scores_RV = scores_RV.clone()
    scores_RV[:, cfg.sot_id] = float("-inf")
    if cfg.pad_id != cfg.eos_id:
        scores_RV[:, cfg.pad_id] = float("-inf")
    if step < cfg.min_len:
        scores_RV[:, cfg.eos_id] = float("-inf")
    return scores_RV


def _filter_top_k_top_p(logits_RV: Tensor, top_k: int, top_p: float) -> Tensor:
    """Keep the ``top_k`` largest logits (0: all), then the smallest set of most probable tokens
    whose probability reaches ``top_p``; the rest become -inf. The best token always stays."""
    if top_k > 0:
        kth_R1 = logits_RV.topk(min(top_k, logits_RV.shape[1]), dim=1).values[:, -1:]
        logits_RV = logits_RV.masked_fill(logits_RV < kth_R1, float("-inf"))
    if top_p < 1.0:
        sorted_RV, order_RV = logits_RV.sort(dim=1, descending=True)
        probs_RV = sorted_RV.softmax(dim=1)
        before_RV = probs_RV.cumsum(dim=1) - probs_RV  # mass of the better tokens
        drop_RV = torch.zeros_like(before_RV, dtype=torch.bool).scatter(1, order_RV, before_RV >= top_p)
        logits_RV = logits_RV.masked_fill(drop_RV, float("-inf"))
    return logits_RV


def _finish(tokens_BT: Tensor, cfg: _Settings) -> Tensor:
    """Pad after each row's first end-of-text and drop the columns no row uses."""
    eos_BT = tokens_BT == cfg.eos_id
    eos_BT[:, 0] = False
    after_BT = (eos_BT.long().cumsum(dim=1) - eos_BT.long()) > 0  # strictly after the first eos
    tokens_BT = tokens_BT.masked_fill(after_BT, cfg.pad_id)
    width = int((~after_BT).sum(dim=1).max())
    return tokens_BT[:, :width]


def _one_path(model, image_embs_BND: Tensor, cfg: _Settings, sample: bool) -> Tensor:
    """Greedy (argmax) or sampled decoding; finished rows stop being run through the model."""
    B, device = image_embs_BND.shape[0], image_embs_BND.device
    tokens_BT = torch.full((B, 1), cfg.sot_id, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for step in range(1, cfg.max_len + 1):
        live = (~done_B).nonzero().squeeze(1)
        logits_RV = _next_logits(model, image_embs_BND[live], tokens_BT[live])
        logits_RV = _forbid(_penalise_repeats(logits_RV, tokens_BT[live], cfg.repetition_penalty), step, cfg)
        if sample:
            logits_RV = _filter_top_k_top_p(logits_RV / cfg.temperature, cfg.top_k, cfg.top_p)
            next_R = torch.multinomial(logits_RV.softmax(dim=1), 1, generator=cfg.generator).squeeze(1)
        else:
            next_R = logits_RV.argmax(dim=1)
        next_B = torch.full((B,), cfg.pad_id, dtype=torch.long, device=device)
        next_B[live] = next_R
        tokens_BT = torch.cat([tokens_BT, next_B[:, None]], dim=1)
        done_B |= next_B == cfg.eos_id
        if done_B.all():
            break
    return _finish(tokens_BT, cfg)


def _keep_best(scores_BM: Tensor, tokens_BMS: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` highest-scoring of M hypotheses per image: (scores B x k, tokens B x k x S)."""
    top_Bk, idx_Bk = scores_BM.topk(k, dim=1)
    return top_Bk, tokens_BMS.gather(1, idx_Bk[..., None].expand(-1, -1, tokens_BMS.shape[2]))


def _beam_search(model, image_embs_BND: Tensor, cfg: _Settings) -> Tensor:
    """Beam search over B x K beams at once; a hypothesis scores sum(log p) / length**length_penalty.

    Per step, each image's 2K best continuations are ranked: end-of-text ones among the first K
    join its finished hypotheses (the K best are kept), the first K others become the next beams.
    An image is done (transformers' default ``early_stopping=False`` rule) once it holds K
    finished hypotheses and its best live beam, normalised at the current length, cannot beat the
    worst of them; at ``max_len`` the live beams of images not done join the finished set, cut.
    With K = 1 this is greedy search.
    """
    B, K, S, device = image_embs_BND.shape[0], cfg.num_beams, cfg.max_len + 1, image_embs_BND.device
    embs_RND = image_embs_BND.repeat_interleave(K, dim=0)
    tokens_RT = torch.full((B * K, 1), cfg.sot_id, dtype=torch.long, device=device)
    beam_BK = torch.zeros(B, K, device=device)
    beam_BK[:, 1:] = float("-inf")  # the K start beams are identical: expand only the first
    fin_BK = torch.full((B, K), float("-inf"), device=device)
    fin_BKS = torch.full((B, K, S), cfg.pad_id, dtype=torch.long, device=device)
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    rank_1C = torch.arange(2 * K, device=device)[None]  # C = 2K candidates per image
    for step in range(1, cfg.max_len + 1):
        logits_RV = _penalise_repeats(_next_logits(model, embs_RND, tokens_RT), tokens_RT, cfg.repetition_penalty)
        logp_RV = _forbid(logits_RV.log_softmax(dim=1), step, cfg)
        V = logp_RV.shape[1]
        cand_BC, flat_BC = (beam_BK[..., None] + logp_RV.view(B, K, V)).view(B, K * V).topk(2 * K, dim=1)
        src_BC, token_BC = flat_BC // V, flat_BC % V
        is_eos_BC = token_BC == cfg.eos_id

        # finished: end-of-text among the K best, for images still searching
        new_fin_BC = is_eos_BC & (rank_1C < K) & ~done_B[:, None] & cand_BC.isfinite()
        if new_fin_BC.any():
            prefix_BCT = tokens_RT.view(B, K, -1).gather(1, src_BC[..., None].expand(-1, -1, step))
            hyp_BCS = F.pad(torch.cat([prefix_BCT, token_BC[..., None]], dim=2), (0, S - step - 1), value=cfg.pad_id)
            score_BC = torch.where(new_fin_BC, cand_BC / step**cfg.length_penalty, float("-inf"))
            fin_BK, fin_BKS = _keep_best(torch.cat([fin_BK, score_BC], 1), torch.cat([fin_BKS, hyp_BCS], 1), K)

        # live: the K best continuations that are not end-of-text (at most K of the 2K are)
        keep_BK = is_eos_BC.to(torch.int8).sort(dim=1, stable=True).indices[:, :K]
        beam_BK = cand_BC.gather(1, keep_BK)
        rows_R = (torch.arange(B, device=device)[:, None] * K + src_BC.gather(1, keep_BK)).view(-1)
        tokens_RT = torch.cat([tokens_RT[rows_R], token_BC.gather(1, keep_BK).view(-1, 1)], dim=1)

        full_B = fin_BK.isfinite().sum(dim=1) >= K
        done_B |= full_B & (beam_BK.max(dim=1).values / step**cfg.length_penalty <= fin_BK.min(dim=1).values)
        if done_B.all():
            break
    if not done_B.all():
        live_BK = torch.where(done_B[:, None], float("-inf"), beam_BK / step**cfg.length_penalty)
        live_BKS = F.pad(tokens_RT.view(B, K, -1), (0, S - tokens_RT.shape[1]), value=cfg.pad_id)
        fin_BK, fin_BKS = _keep_best(torch.cat([fin_BK, live_BK], 1), torch.cat([fin_BKS, live_BKS], 1), K)
    return _finish(fin_BKS[:, 0], cfg)


@torch.no_grad()
def generate_captions(
    model,
    images_B3HW: Tensor,
    *,
    strategy: str = "beam",
    max_len: int = 30,
    min_len: int = 2,
    num_beams: int = 4,
    top_k: int = 0,
    top_p: float = 1.0,
    temperature: float = 1.0,
    repetition_penalty: float = 1.0,
    length_penalty: float = 1.0,
    generator: torch.Generator | None = None,
    sot_id: int = SOT_ID,
    eos_id: int = EOS_ID,
    pad_id: int | None = None,
) -> Tensor:
    """Caption token ids for a batch of preprocessed images.

    Args:
        model: an open_clip ``CoCa`` (run in eval mode here; its mode is restored after).
        images_B3HW: preprocessed pixels on the model's device.
        strategy: ``greedy`` (argmax), ``beam`` (``num_beams`` beams; ``length_penalty`` is the
            exponent of the length dividing a hypothesis' summed log-probability) or ``sample``
            (``temperature``, then ``top_k`` (0: off) and nucleus ``top_p`` (1: off), drawn with
            ``generator``, which must live on the images' device).
        max_len: at most this many tokens after start-of-text, end-of-text included.
        min_len: end-of-text is forbidden as any of the first ``min_len - 1`` new tokens, so a
            caption has at least ``min_len - 1`` tokens besides start- and end-of-text.
        repetition_penalty: CTRL's penalty on tokens already generated (1: off).
        sot_id, eos_id, pad_id: special token ids (pad default: ``model.pad_id``).
    Returns:
        LongTensor B x T, T <= max_len + 1: start-of-text, the caption, end-of-text (absent when
        cut at ``max_len``), then pad up to the longest row.
    Raises:
        GenerationError: not a CoCa model, unknown strategy, max_len outside
            [1, :func:`max_caption_len`], min_len outside [0, max_len], or an invalid setting.
    """
    cfg = _settings(
        model,
        strategy,
        max_len=max_len,
        min_len=min_len,
        num_beams=num_beams,
        top_k=top_k,
        top_p=top_p,
        temperature=temperature,
        repetition_penalty=repetition_penalty,
        length_penalty=length_penalty,
        sot_id=sot_id,
        eos_id=eos_id,
        pad_id=pad_id,
        generator=generator,
    )
    if images_B3HW.ndim != 4:
        raise GenerationError(f"expected images B x 3 x H x W, got shape {tuple(images_B3HW.shape)}")
    was_training = model.training
    model.eval()
    try:
        _, image_embs_BND = model._encode_image(images_B3HW)
        if strategy == "beam":
            return _beam_search(model, image_embs_BND, cfg)
        return _one_path(model, image_embs_BND, cfg, sample=strategy == "sample")
    finally:
        model.train(was_training)


@torch.no_grad()
def sequence_log_probs(model, images_B3HW: Tensor, tokens_BT: Tensor, *, eos_id: int = EOS_ID) -> Tensor:
    """Teacher-forced sum of log p(token | image, prefix) over each row's tokens after
    start-of-text, up to and including its first end-of-text (pad after it is not counted).
    Returns float32 B; the length a row is scored over is ``(tokens_BT[:, 1:] != pad).sum(1)``."""
    check_captioner(model)
    was_training = model.training
    model.eval()
    try:
        _, image_embs_BND = model._encode_image(images_B3HW)
        _, token_embs_BTD = model._encode_text(tokens_BT)
        logits_BLV = model.text_decoder(image_embs_BND, token_embs_BTD[:, :-1]).float()  # L = T - 1
    finally:
        model.train(was_training)
    labels_BL = tokens_BT[:, 1:]
    logp_BL = logits_BLV.log_softmax(dim=2).gather(2, labels_BL[..., None]).squeeze(2)
    eos_BL = (labels_BL == eos_id).long()
    counted_BL = ((eos_BL.cumsum(dim=1) - eos_BL) == 0) & (labels_BL != getattr(model, "pad_id", 0))
    return (logp_BL * counted_BL).sum(dim=1)


def decode_captions(tokenizer, tokens_BT: Tensor, *, sot_id: int = SOT_ID, eos_id: int = EOS_ID, pad_id: int = 0):
    """Token rows -> text: the ids up to the first end-of-text, without special tokens, decoded by
    the tokenizer's ``decode`` (open_clip's BPE decoder if it has none) and stripped."""
    import open_clip

    decode = getattr(tokenizer, "decode", None)
    if decode is None and hasattr(tokenizer, "tokenizer"):  # open_clip's HFTokenizer wraps one
        decode = tokenizer.tokenizer.decode
    texts = []
    for row in tokens_BT.tolist():
        ids = row[1:] if row and row[0] == sot_id else row
        ids = ids[: ids.index(eos_id)] if eos_id in ids else ids
        ids = [i for i in ids if i not in (sot_id, pad_id)]
        text = decode(ids) if decode is not None else open_clip.decode(torch.tensor(ids))
        texts.append(" ".join(text.split()))
    return texts


def caption_images(model, tokenizer, images: Sequence | Tensor, preprocess=None, **kw) -> list[str]:
    """Captions of PIL images (``preprocess`` required) or a preprocessed B x 3 x H x W tensor.

    ``kw`` go to :func:`generate_captions`; the special token ids come from ``tokenizer``
    (open_clip's ``sot_token_id`` / ``eot_token_id``) when it has them. Raises GenerationError as
    :func:`generate_captions`, or when PIL images come without ``preprocess``.
    """
    check_captioner(model)
    param = next(model.parameters())
    if not isinstance(images, Tensor):
        if preprocess is None:
            raise GenerationError("caption_images: PIL images need preprocess (the model's image transform)")
        images = torch.stack([preprocess(image) for image in images])
    images = images.to(param.device, param.dtype)
    kw.setdefault("sot_id", getattr(tokenizer, "sot_token_id", SOT_ID))
    kw.setdefault("eos_id", getattr(tokenizer, "eot_token_id", EOS_ID))
    tokens_BT = generate_captions(model, images, **kw)
    pad = kw.get("pad_id") if kw.get("pad_id") is not None else int(getattr(model, "pad_id", 0))
    return decode_captions(tokenizer, tokens_BT, sot_id=kw["sot_id"], eos_id=kw["eos_id"], pad_id=pad)
