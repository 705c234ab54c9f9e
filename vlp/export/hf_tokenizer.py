"""open_clip's CLIP tokenizer as Hugging Face ``CLIPTokenizer`` files (``vocab.json``, ``merges.txt``).

open_clip ships OpenAI's byte-level BPE as one gzipped merges file and builds its vocabulary from
it at start-up: the 256 byte symbols, the same with an end-of-word ``</w>``, one token per merge
(in merge order), then the two special tokens. Hugging Face reads the same BPE from a
token -> id table and a merges list. Everything is derived here from the file open_clip itself
loads, offline, so the ids agree by construction; only the specials are renamed to OpenAI's
spelling (``<|startoftext|>``, ``<|endoftext|>``), which is what ``CLIPTokenizer`` expects.

Text clean-up differs slightly: open_clip runs ``ftfy`` and unescapes HTML entities before
lower-casing, ``CLIPTokenizer`` only normalises Unicode (NFC), whitespace and case. Plain captions
tokenize identically; ``&amp;`` or mojibake do not.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
NUM_MERGES = 49152 - 256 - 2  # open_clip keeps this many merges: a 49408-token vocabulary


def clip_bpe_merges(bpe_path: str | Path | None = None) -> list[tuple[str, str]]:
    """The merges open_clip's SimpleTokenizer uses, in rank order (file header skipped)."""
    from open_clip.tokenizer import default_bpe

    with gzip.open(bpe_path or default_bpe(), "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    return [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]


def clip_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """token -> id exactly as open_clip's SimpleTokenizer numbers them (specials spelled as OpenAI's)."""
    from open_clip.tokenizer import bytes_to_unicode

    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [BOS, EOS]
    return {token: i for i, token in enumerate(tokens)}


def write_clip_tokenizer_files(out: str | Path, context_length: int) -> list[str]:
    """Write ``vocab.json``, ``merges.txt``, ``tokenizer_config.json`` and
    ``special_tokens_map.json`` into ``out``; returns the file names written."""
    out = Path(out)
    merges = clip_bpe_merges()
    vocab = clip_vocab(merges)
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    # merges.txt starts with a version line, as every byte-level BPE merges file Hugging Face reads
    merge_lines = ["#version: 0.2"] + [" ".join(m) for m in merges]
    (out / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    specials = {"bos_token": BOS, "eos_token": EOS, "unk_token": EOS, "pad_token": EOS}
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": context_length,
        "do_lower_case": True,
        "errors": "replace",
        **specials,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (out / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n", encoding="utf-8")
    return ["vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json"]
