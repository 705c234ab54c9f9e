"""Do generated captions of held-out shapes images name the right shape and colour?

For the single-group held-out shapes scenes (``vlp shards --synthetic --single-group``), each image
shows one colour and one shape. A caption *names the shape* when it contains that shape's word
(singular or plural) and no other shape's; likewise for the colour. Chance is 1/6 for each: a
captioner that names one shape at random.
"""

from __future__ import annotations

import json
import re

from vlp.data.synthetic import COLORS, PLURALS, SHAPES


def _named(caption: str, vocabulary: dict[str, set[str]]) -> set[str]:
    words = set(re.findall(r"[a-z]+", caption.lower()))
    return {name for name, forms in vocabulary.items() if words & forms}


SHAPE_FORMS = {s: {s, PLURALS[s]} for s in SHAPES}
COLOUR_FORMS = {c: {c} for c in COLORS}


def shape_caption_metrics(captions: list[str], labels: list[tuple[str, str]]) -> dict:
    """``labels``: (colour, shape) of each image. Returns fractions in [0, 1] and their chance."""
    if len(captions) != len(labels) or not captions:
        raise ValueError(f"{len(captions)} captions for {len(labels)} labelled images")
    shape_ok = colour_ok = both = 0
    for caption, (colour, shape) in zip(captions, labels):
        s = _named(caption, SHAPE_FORMS) == {shape}
        c = _named(caption, COLOUR_FORMS) == {colour}
        shape_ok, colour_ok, both = shape_ok + s, colour_ok + c, both + (s and c)
    n = len(captions)
    return {
        "caption_names_shape": shape_ok / n,
        "caption_names_colour": colour_ok / n,
        "caption_names_both": both / n,
        "caption_shape_chance": 1 / len(SHAPES),
        "caption_colour_chance": 1 / len(COLORS),
        "caption_both_chance": 1 / (len(SHAPES) * len(COLORS)),
        "caption_num_images": n,
    }


def read_single_group_shard(path: str, limit: int = 0) -> tuple[list[bytes], list[tuple[str, str]]]:
    """Image bytes and (colour, shape) of a held-out shapes shard's samples."""
    from vlp.data.decode import SkipCounter
    from vlp.data.stream import _shard_samples

    images, labels = [], []
    for raw in _shard_samples(path, SkipCounter()):
        groups = json.loads(raw["json"])["groups"]
        if len(groups) != 1 or "png" not in raw:
            continue
        images.append(raw["png"])
        labels.append((groups[0]["color"], groups[0]["shape"]))
        if limit and len(images) == limit:
            break
    return images, labels
