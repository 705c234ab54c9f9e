"""Counting the captions a tokenizer cut to fit its context (the tokenizer itself lives with the
models: :mod:`vlp.models.tokenizer`; the stream is handed one)."""

from __future__ import annotations


def count_truncated(tokenizer, texts: list[str], ids) -> int:
    """How many of ``texts`` the tokenizer cut to fit its context: ``ids`` (``B x L``) is what it
    returned for them. Only rows that fill the whole context are tokenized again, one token longer,
    so the cost is small when few captions are long. 0 for a tokenizer that cannot be asked for
    another context length."""
    length = ids.shape[-1] if ids.dim() == 2 else 0
    if not length or not len(texts):
        return 0
    pad = _pad_id(tokenizer)
    full = (ids[:, -1] != pad).nonzero().flatten().tolist()
    if not full:
        return 0
    try:
        longer = tokenizer([texts[i] for i in full], context_length=length + 1)
    except TypeError:
        return 0
    return int((longer[:, -1] != pad).sum())


def _pad_id(tokenizer) -> int:
    inner = getattr(tokenizer, "tokenizer", None)  # open_clip's HFTokenizer wraps a transformers one
    pad = getattr(inner, "pad_token_id", None)
    return int(pad) if pad is not None else 0
