"""compositional: does the image score its caption above captions with attributes or objects swapped
or replaced (the synthetic layout, SugarCrepe)?

Legend: N images, T texts (each kept image's positive, then its negatives), D feature dim.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

from vlp.data.textfiles import read_text
from vlp.eval.datasets import EvalData, EvalDataError, Row, collect, get_field, image_path, jsonl_rows
from vlp.eval.extract import text_features
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register


def _sugarcrepe_rows(path: Path, images_root: Path) -> Iterator[Row]:
    """Rows of SugarCrepe's ``{id: {"filename", "caption", "negative_caption"}}``; type = stem."""
    try:
        text = read_text(path, error=EvalDataError)
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read SugarCrepe JSON: {e}") from None
    try:
        entries = json.loads(text)
    except ValueError as e:
        raise EvalDataError(f"{path}: cannot read SugarCrepe JSON: {e}") from None
    if not isinstance(entries, dict) or not all(isinstance(e, dict) for e in entries.values()):
        raise EvalDataError(f"{path}: expected SugarCrepe's {{id: {{filename, caption, negative_caption}}}}")
    for key, entry in entries.items():
        where = f"{path}[{key!r}]"
        record = {"positives": get_field(entry, "caption", str, where), "types": path.stem}
        record["negatives"] = [get_field(entry, "negative_caption", str, where)]
        yield where, image_path(entry, "filename", images_root, where), record


def load_compositional(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> EvalData:
    """JSONL rows or a SugarCrepe ``.json`` file -> images, positives, negatives, types.
    JSONL: ``{"image", "positive", "negatives": [str] (or "negative": str), "type": str?}``.
    Images are relative to ``images_root`` (default: the file's folder); rows with a missing
    image are skipped and counted (``missing_image``). Raises EvalDataError: file not found,
    malformed JSON, a field missing or of the wrong type, empty negatives, no usable row.
    """
    path = Path(path)
    root = Path(images_root) if images_root is not None else path.parent

    def rows() -> Iterator[Row]:
        for where, row in jsonl_rows(path):
            record = {"positives": get_field(row, "positive", str, where)}
            record["negatives"] = get_field(row, "negatives", list, where, alt="negative")
            if not record["negatives"]:
                raise EvalDataError(f"{where}: 'negatives' is empty")
            record["types"] = get_field(row, "type", str, where) if row.get("type") is not None else None
            yield where, image_path(row, "image", root, where), record

    return collect(path, path.stem, _sugarcrepe_rows(path, root) if path.suffix.lower() == ".json" else rows())


def run_compositional(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """Accuracy that the positive caption scores above every negative, overall and per type
    (``acc_<type>``), and its chance."""
    feats_ND, kept = encode_images(model, data, ctx)
    texts = [t for i in kept for t in (data.positives[i], *data.negatives[i])]
    text_features_TD = text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size)
    pos = 0
    correct, by_type = {}, {}
    for i in kept:
        n = 1 + len(data.negatives[i])
        scores = text_features_TD[pos : pos + n] @ feats_ND[i]
        pos += n
        correct[i] = bool((scores[0] > scores[1:]).all())
        kind = (data.types[i] if data.types else None) or "all"
        by_type.setdefault(kind, []).append(correct[i])
    out = {"acc": sum(correct.values()) / max(1, len(correct)), "num_samples": len(correct)}
    for kind, hits in sorted(by_type.items()):
        out[f"acc_{kind}"] = sum(hits) / len(hits)
    out["chance"] = sum(1 / (1 + len(data.negatives[i])) for i in kept) / max(1, len(kept))
    return out


TASK = register(EvalTask("compositional", load=load_compositional, run=run_compositional, options=("images_root",)))
