"""Tokenization with open_clip's tokenizers (the one that matches the architecture)."""

from __future__ import annotations

from functools import lru_cache


def get_tokenizer(model):
    """open_clip's tokenizer for ``model`` (an architecture name or a ``vlp.config.ModelConfig``):
    ``tok(list[str]) -> LongTensor[B, context_length]``.

    A Hugging Face text tower (``model.text.hf_model_name_or_path``) gets its own tokenizer via
    open_clip's ``HFTokenizer``. Texts longer than the context are truncated (the end-of-text token
    kept); empty strings give a start/end pair.
    """
    if isinstance(model, str):
        return _named_tokenizer(model)
    t = model.text
    if t.hf_model_name_or_path:
        from vlp.models.towers import hf_location

        return _hf_tokenizer(hf_location(t.hf_model_name_or_path), t.context_length)
    return _named_tokenizer(model.name)


@lru_cache(maxsize=8)
def _named_tokenizer(model_name: str):
    import open_clip

    from vlp.models.registry import get_model_config

    get_model_config(model_name)  # registers vlp's configs; clear error on unknown names
    return open_clip.get_tokenizer(model_name)


@lru_cache(maxsize=4)
def _hf_tokenizer(path: str, context_length: int):
    from open_clip.tokenizer import HFTokenizer

    return HFTokenizer(path, context_length=context_length)
