"""counting: pick the count 2..10 whose caption ("three red circles" -> "two/four/... red circles")
scores highest with the image.

Legend: N images, C counts (2..10), D feature dim.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch

from vlp.eval.datasets import EvalData, Row, collect, get_field, image_path, jsonl_rows
from vlp.eval.extract import text_features
from vlp.eval.plots import plot_confusion
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register

COUNTS = tuple(range(2, 11))
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


def find_number(caption: str, count: int) -> tuple[int, int] | None:
    """Span ``(start, end)`` of the first whole word of ``caption`` naming ``count`` (an int 2..10):
    its digits or its word, any case (``"13"``/``"3rd"`` do not match 3); else None."""
    if type(count) is not int or count not in NUMBER_WORDS:  # type(): a bool is no count
        return None
    match = re.search(rf"\b(?:{count}|{NUMBER_WORDS[count]})\b", caption, flags=re.IGNORECASE)
    return match.span() if match else None


def load_counting(path: str | os.PathLike) -> EvalData:
    """JSONL ``{"image", "caption", "count"}`` -> images, captions, counts.
    Skipped and counted: a count that is not an int in 2..10 (``bad_count``), a caption without
    the count's digits or word (``caption_without_number``, see :func:`find_number`), a missing
    image (``missing_image``). Raises EvalDataError: file not found, malformed line,
    ``image``/``caption`` not a str, no usable row.
    """
    path = Path(path)

    def rows() -> Iterator[Row]:
        for where, row in jsonl_rows(path):
            caption, count = get_field(row, "caption", str, where).strip(), row.get("count")
            bad = "bad_count" if type(count) is not int or count not in NUMBER_WORDS else "caption_without_number"
            record = {"captions": caption, "counts": count} if find_number(caption, count) else bad
            yield where, image_path(row, "image", path.parent, where), record

    return collect(path, path.stem, rows())


def count_captions(caption: str, count: int) -> list[str]:
    """The caption rewritten for every count in 2..10, keeping digits as digits and words as words.
    Raises ValueError when the caption does not name ``count``."""
    span = find_number(caption, count)
    if span is None:
        raise ValueError(f"caption has no number for count {count}: {caption!r}")
    start, end = span
    word = caption[start:end]
    out = []
    for n in COUNTS:
        new = str(n) if word.isdigit() else NUMBER_WORDS[n]
        if word[:1].isupper():
            new = new.capitalize()
        out.append(caption[:start] + new + caption[end:])
    return out


def run_counting(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """Pick the count 2..10 whose caption scores highest: accuracy, MAE, confusion matrix (rows: true
    count), its chance; with ``ctx.plots_dir`` also ``confusion_png``, the matrix drawn there."""
    feats_ND, kept = encode_images(model, data, ctx)
    texts = [t for i in kept for t in count_captions(data.captions[i], data.counts[i])]
    text_NCD = text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size).view(
        len(kept), len(COUNTS), -1
    )
    scores_NC = torch.einsum("ncd,nd->nc", text_NCD, feats_ND[kept])
    pred = torch.as_tensor(COUNTS)[scores_NC.argmax(1)]
    true = torch.as_tensor([data.counts[i] for i in kept])
    confusion = torch.zeros(len(COUNTS), len(COUNTS), dtype=torch.long)
    for t, p in zip(true.tolist(), pred.tolist()):
        confusion[t - COUNTS[0], p - COUNTS[0]] += 1
    out = {
        "acc": (pred == true).double().mean().item(),
        "mae": (pred - true).abs().double().mean().item(),
        "num_samples": len(kept),
        "chance": 1 / len(COUNTS),
        "confusion_matrix": confusion.tolist(),
        "counts": list(COUNTS),
    }
    if ctx.plots_dir is not None and ctx.env.is_main:
        out["confusion_png"] = str(plot_confusion(confusion, COUNTS, Path(ctx.plots_dir) / "counting_confusion.png"))
    return out


TASK = register(EvalTask("counting", load=load_counting, run=run_counting))
