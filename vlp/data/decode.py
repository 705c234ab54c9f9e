"""Turn raw WebDataset samples (dicts of bytes) into training samples, skipping bad ones.

Bad data never stops a run: each problem is counted by kind in a :class:`SkipCounter` that
travels with the batches to the training process, which reports the totals in its metrics.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass

from PIL import Image

from vlp.data.images import ImagePolicy, open_image

log = logging.getLogger(__name__)

# Kinds of skipped or repaired data, in the order they are reported.
SKIP_KINDS = (
    "shard_error",  # unreadable or truncated tar: the rest of that shard is skipped
    "missing_image",
    "corrupt_image",  # zero bytes, undecodable or truncated image data
    "image_too_large",  # more pixels than data.max_image_pixels
    "animated_image",  # animated or multi-frame (GIF, WebP, APNG, multi-page TIFF)
    "missing_caption",
    "empty_caption",
    "bad_caption_encoding",  # not UTF-8
    "bad_json",  # metadata that is not a JSON object: sample kept, metadata dropped
    "duplicate_caption",  # data.unique_captions: deferred too long behind same-caption samples
)


class SkipCounter:
    """Counts skipped samples by kind; ``drain()`` returns and resets the counts since last drain."""

    def __init__(self, examples_per_kind: int = 3):
        self.counts: Counter = Counter()
        self._pending: Counter = Counter()
        self._examples: dict[str, int] = Counter()
        self._limit = examples_per_kind

    def add(self, kind: str, where: str = "", detail: str = "") -> None:
        self.counts[kind] += 1
        self._pending[kind] += 1
        if self._examples[kind] < self._limit:
            self._examples[kind] += 1
            log.warning("skipped bad data (%s) at %s: %s", kind, where or "?", detail[:200])

    def drain(self) -> dict[str, int]:
        out = dict(self._pending)
        self._pending.clear()
        return out


@dataclass
class DecodeOptions:
    image_keys: tuple[str, ...] = ("jpg", "jpeg", "png", "webp")
    text_key: str = "txt"
    max_image_pixels: int = 50_000_000
    # JPEGs are decoded at 1/2, 1/4 or 1/8 scale when both sides stay >= this (0 = full size);
    # see vlp.data.transforms.draft_min_side for the value that keeps the training crop's pixels
    draft_min_side: int = 0
    # EXIF orientation, alpha background (vlp.data.images); max_pixels is max_image_pixels above
    image_policy: ImagePolicy = dataclasses.field(default_factory=ImagePolicy)


def _where(raw: dict) -> str:
    return f"{raw.get('__url__', '?')}#{raw.get('__key__', '?')}"


def decode_image(
    data: bytes, max_pixels: int, min_side: int = 0, policy: ImagePolicy | None = None
) -> tuple[Image.Image | None, str]:
    """Decode to RGB under ``policy`` (EXIF orientation, alpha, bit depth: :mod:`vlp.data.images`),
    checking the size from the header before decoding pixels; ``(None, kind)`` for a bad image.

    With ``min_side`` > 0 a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose
    width and height are both still >= ``min_side`` (libjpeg's scaled inverse DCT: the reduced
    image is made during decoding, several times faster than decoding everything and resizing).
    Other formats, and JPEGs too small to reduce, decode exactly as without it.
    """
    policy = policy or ImagePolicy()
    if policy.max_pixels != max_pixels:
        policy = dataclasses.replace(policy, max_pixels=max_pixels)
    return open_image(data, policy, min_side)


def decode_caption(data) -> tuple[str | None, str]:
    if data is None:
        return None, "missing_caption"
    if isinstance(data, bytes):
        try:
            data = data.decode("utf-8")
        except UnicodeDecodeError:
            return None, "bad_caption_encoding"
    text = data.strip()
    if not text:
        return None, "empty_caption"
    return text, ""


def decode_sample(raw: dict, opts: DecodeOptions, skips: SkipCounter) -> dict | None:
    """Raw sample -> ``{"image": PIL RGB, "text": str, "json": dict, "__key__": str}`` or None."""
    image_bytes = next((raw[k] for k in opts.image_keys if k in raw), None)
    if image_bytes is None:
        skips.add("missing_image", _where(raw), f"fields present: {sorted(k for k in raw if not k.startswith('__'))}")
        return None
    text, problem = decode_caption(raw.get(opts.text_key))
    if problem:
        skips.add(problem, _where(raw))
        return None
    image, problem = decode_image(image_bytes, opts.max_image_pixels, opts.draft_min_side, opts.image_policy)
    if problem:
        skips.add(problem, _where(raw), f"{len(image_bytes)} bytes")
        return None
    meta = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
            if not isinstance(meta, dict):
                raise ValueError("not an object")
        except ValueError:
            skips.add("bad_json", _where(raw))
            meta = {}
    if "cls" in raw:
        # WebDataset's class-label convention: an integer in a ``cls`` member
        try:
            meta["cls"] = int(raw["cls"].decode() if isinstance(raw["cls"], bytes) else raw["cls"])
        except ValueError:
            skips.add("bad_json", _where(raw), "cls is not an integer")
    return {"image": image, "text": text, "json": meta, "__key__": raw.get("__key__", "")}


def caption_variants(meta: dict, field: str) -> list[str]:
    """The usable captions of the list ``meta[field]``: stripped, non-empty, first occurrence kept;
    non-strings are ignored. Empty when ``meta`` has no such list."""
    variants = meta.get(field) if isinstance(meta, dict) else None
    if not isinstance(variants, list):
        return []
    stripped = (v.strip() for v in variants if isinstance(v, str))
    return list(dict.fromkeys(v for v in stripped if v))


def caption_variant(meta: dict, field: str, seed: int, key: str, epoch: int) -> str | None:
    """One caption drawn from :func:`caption_variants`, or None when there is none.

    The draw depends only on (seed, key, epoch), so it differs between epochs and a resumed run
    draws the same caption.
    """
    choices = caption_variants(meta, field)
    if not choices:
        return None
    return random.Random(f"variant/{seed}/{key}/{epoch}").choice(choices)
