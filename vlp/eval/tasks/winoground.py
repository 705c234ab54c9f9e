"""winoground: Winoground (Thrush et al., CVPR 2022, arXiv:2204.03162). Each example holds two images
and two captions made of the same words in a different order; caption_0 goes with image_0 and
caption_1 with image_1. Does the model match them?

Scores as the paper defines them, in the form of the ``text_correct`` / ``image_correct`` /
``group_correct`` functions of the authors' CLIP example for the dataset, with s(c, i) the cosine
similarity of caption c and image i and strict ``>`` (a tie is a miss):

- text score:  s(c0, i0) > s(c1, i0) and s(c1, i1) > s(c0, i1)  (each image picks its caption)
- image score: s(c0, i0) > s(c0, i1) and s(c1, i1) > s(c1, i0)  (each caption picks its image)
- group score: both.

Legend: N images (two per example: image_0, image_1), E scored examples, D feature dim.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.eval.datasets import IMAGE_EXTENSIONS, EvalData, EvalDataError, Row, collect, get_field, jsonl_rows
from vlp.eval.extract import text_features
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register

EXAMPLES_FILE = "examples.jsonl"  # the release: data/examples.jsonl and data/images.zip (-> images/)
TAG_FIELD = "collapsed_tag"  # the paper's swap-dependent linguistic tag: Object, Relation or Both


def _image_file(name: str, root: Path) -> str:
    """Absolute path of an example's image: the release names them without an extension
    (``ex_0_img_0`` for ``images/ex_0_img_0.png``), so a name without an image extension gets
    the first of .jpg/.jpeg/.png/.webp/.bmp that exists (.png when none does)."""
    path = Path(name).expanduser()
    path = path if path.is_absolute() else root / path
    if path.suffix.lower() not in IMAGE_EXTENSIONS:
        candidates = [path.with_name(path.name + ext) for ext in IMAGE_EXTENSIONS]
        path = next((p for p in candidates if p.is_file()), path.with_name(path.name + ".png"))
    return os.path.abspath(path)


def _rows(path: Path, images_root: Path) -> Iterator[Row]:
    """Two rows per example, image_0 with caption_0 then image_1 with caption_1 (``types``: the
    example's collapsed tag, or None); an example missing either image is one ``missing_image``."""
    for where, row in jsonl_rows(path):
        captions = [get_field(row, f"caption_{k}", str, where) for k in (0, 1)]
        images = [_image_file(get_field(row, f"image_{k}", str, where), images_root) for k in (0, 1)]
        tag = row.get(TAG_FIELD)
        tag = tag.strip() if isinstance(tag, str) and tag.strip() else None
        missing = [image for image in images if not os.path.isfile(image)]
        if missing:
            yield where, missing[0], "missing_image"
            continue
        for k in (0, 1):
            yield f"{where}:image_{k}", images[k], {"captions": [captions[k]], "types": tag}


def _examples_file(path: Path) -> Path:
    """``path`` itself, or for a folder its examples.jsonl (or data/examples.jsonl, the dataset
    repository's layout)."""
    if not path.is_dir():
        return path  # jsonl_rows names it when it is missing
    for candidate in (path / EXAMPLES_FILE, path / "data" / EXAMPLES_FILE):
        if candidate.is_file():
            return candidate
    raise EvalDataError(f"{path}: no {EXAMPLES_FILE} (expected Winoground's {EXAMPLES_FILE} and images/ folder)")


def load_winoground(path: str | os.PathLike, images_root: str | os.PathLike | None = None) -> EvalData:
    """Winoground's examples.jsonl -> images (image_0, image_1 of each example, in turn), captions
    (caption_k with image_k, ``text_to_image`` 0, 1, 2, ...), types (the ``collapsed_tag`` of each
    image's example, None when absent).

    ``path``: the jsonl file or a folder holding it. Image names are taken from ``images_root``
    (default: ``images/`` beside the jsonl, where the release's images.zip unpacks). An example
    with a missing image is skipped and counted once (``missing_image``). Raises EvalDataError:
    no file, malformed JSON, a field missing or not a string, no usable example.
    """
    path = Path(path)
    file = _examples_file(path)
    root = Path(images_root) if images_root is not None else file.parent / "images"
    return collect(file, path.name if path.is_dir() else path.stem, _rows(file, root))


def _key(tag: str) -> str:
    """A tag as a metric-name suffix: lower case, runs of other characters as ``_``."""
    return re.sub(r"[^0-9a-z]+", "_", tag.lower()).strip("_") or "none"


def _cos(a_ED: torch.Tensor, b_ED: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two normalised matrices -> [E]."""
    return (a_ED * b_ED).sum(dim=-1)


def run_winoground(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """``text_score``, ``image_score``, ``group_score`` (fractions of the examples; see the module
    docstring) and ``num_samples``, the examples with both images read; with tags, the three
    scores per tag too (``text_score_object``, ...). An example with an unreadable image is
    left out whole (the image is counted in ``skipped``)."""
    n = len(data.images)
    if n % 2 or data.captions is None or len(data.captions) != n:
        raise EvalDataError(f"{data.name}: winoground needs images and captions in pairs, one caption per image")
    feats_ND, kept = encode_images(model, data, ctx)
    read = set(kept)
    examples = [e for e in range(n // 2) if 2 * e in read and 2 * e + 1 in read]
    names = ("text_score", "image_score", "group_score")
    out = {**dict.fromkeys(names, 0.0), "num_samples": len(examples)}
    if not examples:
        return out
    texts = [data.captions[j] for e in examples for j in (2 * e, 2 * e + 1)]
    texts_TD = F.normalize(text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size), dim=-1)
    c0_ED, c1_ED = texts_TD[0::2], texts_TD[1::2]
    images_ND = F.normalize(feats_ND, dim=-1)
    i0_ED, i1_ED = images_ND[[2 * e for e in examples]], images_ND[[2 * e + 1 for e in examples]]
    c0_i0, c1_i0, c0_i1, c1_i1 = _cos(c0_ED, i0_ED), _cos(c1_ED, i0_ED), _cos(c0_ED, i1_ED), _cos(c1_ED, i1_ED)
    text = (c0_i0 > c1_i0) & (c1_i1 > c0_i1)
    image = (c0_i0 > c0_i1) & (c1_i1 > c1_i0)
    hits = dict(zip(names, (text.tolist(), image.tolist(), (text & image).tolist())))
    for name in names:
        out[name] = sum(hits[name]) / len(examples)
    by_tag: dict[str, list[int]] = {}
    for k, e in enumerate(examples):
        tag = data.types[2 * e] if data.types else None
        if tag is not None:
            by_tag.setdefault(_key(tag), []).append(k)
    for tag, rows in sorted(by_tag.items()):
        for name in names:
            out[f"{name}_{tag}"] = sum(hits[name][k] for k in rows) / len(rows)
    return out


TASK = register(
    EvalTask(
        "winoground",
        load=load_winoground,
        run=run_winoground,
        options=("images_root",),
        note="examples.jsonl + images/",
    )
)
