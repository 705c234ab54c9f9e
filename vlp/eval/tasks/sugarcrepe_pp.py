"""sugarcrepe_pp: SugarCrepe++ (Dumpala et al., NeurIPS 2024, arXiv:2406.11171). Each COCO image has
two positive captions that say the same thing in different words and one hard negative; does the
image score both positives above the negative (ITT), and does the text encoder alone put the two
positives closer to each other than either is to the negative (TOT)?

The rules are those of the release's evaluation code (github.com/Sri-Harsha/scpp,
``VLMs/test_Variants_CLIP.py`` and ``evaluate_ulms.py``), on cosine similarities, strict ``>``
(a tie is a miss).

Legend: N images, K scored images (read, in order), D feature dim.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.data.textfiles import read_text
from vlp.eval.datasets import EvalData, EvalDataError, Row, collect, get_field, image_path
from vlp.eval.extract import text_features
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register

# the released files (data/ in the repository), one per type; the type of a file is its stem
RELEASE_TYPES = ("replace_att", "replace_obj", "replace_rel", "swap_att", "swap_obj")


def _entries(path: Path) -> list[tuple[str, object]]:
    """``(where, entry)`` of a SugarCrepe++ JSON file: the release's list of entries, or a
    SugarCrepe-style ``{id: entry}`` object."""
    try:
        text = read_text(path, error=EvalDataError)  # a byte that is not UTF-8: EvalDataError naming the line
    except OSError as e:
        raise EvalDataError(f"{path}: cannot read SugarCrepe++ JSON: {e.strerror or e}") from None
    try:
        entries = json.loads(text)
    except ValueError as e:
        raise EvalDataError(f"{path}: cannot read SugarCrepe++ JSON: {e}") from None
    if isinstance(entries, list):
        return [(f"{path}[{i}]", entry) for i, entry in enumerate(entries)]
    if isinstance(entries, dict):
        return [(f"{path}[{key!r}]", entry) for key, entry in entries.items()]
    raise EvalDataError(f"{path}: expected SugarCrepe++'s list of {{filename, caption, caption2, negative_caption}}")


def _rows(path: Path, images_root: Path) -> Iterator[Row]:
    """One row per entry: its image, ``captions`` [caption, caption2] (the two positives),
    ``negatives`` [negative_caption] and the file stem as its type."""
    for where, entry in _entries(path):
        if not isinstance(entry, dict):
            raise EvalDataError(f"{where}: expected an object {{filename, caption, caption2, negative_caption}}")
        positives = [get_field(entry, key, str, where) for key in ("caption", "caption2")]
        record = {"captions": positives, "negatives": [get_field(entry, "negative_caption", str, where)]}
        record["types"] = path.stem
        yield where, image_path(entry, "filename", images_root, where), record


def _json_files(path: Path) -> list[Path]:
    if path.is_dir():
        files = sorted(p for p in path.glob("*.json") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise EvalDataError(f"{path}: no .json files (expected SugarCrepe++'s {', '.join(RELEASE_TYPES)}.json)")
        return files
    if not path.is_file():
        raise EvalDataError(f"{path}: not found (expected a SugarCrepe++ .json file or a folder of them)")
    return [path]


def load_sugarcrepe_pp(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> EvalData:
    """SugarCrepe++'s released JSON -> images, captions (2 per image: ``caption``, ``caption2``),
    negatives (``[negative_caption]``), types (the file stem: swap_att, replace_rel, ...).

    ``path``: one of the files, or a folder (every ``*.json`` in it, sorted). Images are the
    entries' ``filename`` under ``images_root`` (COCO val2017; default: the folder of the files);
    entries whose image is missing are skipped and counted (``missing_image``). Raises
    EvalDataError: no file, malformed JSON, a field missing or not a string, no usable entry.
    """
    path = Path(path)
    files = _json_files(path)
    folder = path if path.is_dir() else path.parent
    root = Path(images_root) if images_root is not None else folder
    rows = (row for file in files for row in _rows(file, root))
    return collect(path, path.name if path.is_dir() else path.stem, rows)


def _key(kind: str) -> str:
    """A type as a metric-name suffix: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", kind.lower()).strip("_") or "none"


def _cos(a_KD: torch.Tensor, b_KD: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two normalised matrices -> [K]."""
    return (a_KD * b_KD).sum(dim=-1)


def run_sugarcrepe_pp(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """``itt_acc`` (image-to-text: the image is more similar to each positive than to the
    negative), ``tot_acc`` (text-only: positive 1 is more similar to positive 2 than to the
    negative, and positive 2 more similar to positive 1 than to the negative), both overall and
    per type (``itt_acc_<type>``, ``tot_acc_<type>``); ``itt_p1_acc`` / ``itt_p2_acc``, the image
    rule for one positive alone; ``num_samples``, the images read. All comparisons strict."""
    if data.captions is None or len(data.captions) != 2 * len(data.images):
        raise EvalDataError(f"{data.name}: sugarcrepe_pp needs two positive captions per image")
    feats_ND, kept = encode_images(model, data, ctx)
    out = {"itt_acc": 0.0, "tot_acc": 0.0, "itt_p1_acc": 0.0, "itt_p2_acc": 0.0, "num_samples": len(kept)}
    if not kept:
        return out
    texts = [t for i in kept for t in (data.captions[2 * i], data.captions[2 * i + 1], data.negatives[i][0])]
    texts_TD = F.normalize(text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size), dim=-1)
    image_KD = F.normalize(feats_ND[kept], dim=-1)
    p1_KD, p2_KD, neg_KD = texts_TD[0::3], texts_TD[1::3], texts_TD[2::3]
    image_p1, image_p2, image_neg = _cos(image_KD, p1_KD), _cos(image_KD, p2_KD), _cos(image_KD, neg_KD)
    p1_p2, p1_neg, p2_neg = _cos(p1_KD, p2_KD), _cos(p1_KD, neg_KD), _cos(p2_KD, neg_KD)
    hits = {
        "itt": ((image_p1 > image_neg) & (image_p2 > image_neg)).tolist(),
        "tot": ((p1_p2 > p1_neg) & (p1_p2 > p2_neg)).tolist(),
        "itt_p1": (image_p1 > image_neg).tolist(),
        "itt_p2": (image_p2 > image_neg).tolist(),
    }
    for name, row_hits in hits.items():
        out[f"{name}_acc"] = sum(row_hits) / len(kept)
    by_type: dict[str, list[int]] = {}
    for k, i in enumerate(kept):
        by_type.setdefault(_key((data.types[i] if data.types else None) or "none"), []).append(k)
    for kind, rows in sorted(by_type.items()):
        for name in ("itt", "tot"):
            out[f"{name}_acc_{kind}"] = sum(hits[name][k] for k in rows) / len(rows)
    return out


TASK = register(
    EvalTask(
        "sugarcrepe_pp",
        load=load_sugarcrepe_pp,
        run=run_sugarcrepe_pp,
        options=("images_root",),
        note="SugarCrepe++ JSON; images under --images-root",
    )
)
