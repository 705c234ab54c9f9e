"""Tokenization with open_clip's tokenizers (the one that matches the architecture)."""

from __future__ import annotations

from functools import lru_cache


@lru_cache(maxsize=8)
def get_tokenizer(model_name: str):
    """open_clip's tokenizer for ``model_name``: ``tok(list[str]) -> LongTensor[B, context_length]``.

    Texts longer than the context are truncated (the end-of-text token kept); empty strings give
    a start/end pair.
    """
    import open_clip

    from vlp.models.registry import get_model_config

    get_model_config(model_name)  # registers vlp's configs; clear error on unknown names
    return open_clip.get_tokenizer(model_name)
