"""Caption options of the training stream: variants drawn per epoch, distinct captions per batch."""

from __future__ import annotations

import io
import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import write_tar
from tests.test_stream import _loader, _take
from vlp.data.decode import SKIP_KINDS, caption_variant
from vlp.data.stream import caption_norm

VARIANTS_KEY = "caption_variants"


def _noise_png(index: int) -> bytes:
    """A different noisy image per index, so crops of different samples never look the same."""
    pixels = np.random.default_rng(index).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def _sample(index: int, caption: str, meta=None) -> dict:
    meta = {"k": index} if meta is None else meta
    key = f"s{index:04d}"
    return {"__key__": key, "png": _noise_png(index), "txt": caption.encode(), "json": json.dumps(meta).encode()}


def _write_shards(folder, samples: list[dict], shards: int = 4) -> str:
    per = len(samples) // shards
    for s in range(shards):
        write_tar(folder / f"c-{s:06d}.tar", samples[s * per : (s + 1) * per])
    return str(folder / f"c-{{000000..{shards - 1:06d}}}.tar")


def _variant_meta(i: int):
    """Usable variant lists for 3 samples in 8; the others exercise every fallback to ``txt``."""
    unusable = [{"k": i}, {VARIANTS_KEY: "not a list"}, {VARIANTS_KEY: []}, {VARIANTS_KEY: [3, None, "  "]}, [1, 2]]
    if i % 8 < len(unusable):
        return unusable[i % 8]
    return {VARIANTS_KEY: [f" variant a {i} ", f"variant b {i}", f"variant c {i}", 7, f"variant b {i}"]}


@pytest.fixture()
def variant_shards(tmp_path) -> str:
    return _write_shards(tmp_path, [_sample(i, f"txt {i}", _variant_meta(i)) for i in range(64)])


def _captions_by_epoch(loader, batches: int) -> dict[tuple[str, int], str]:
    out = {}
    for batch in itertools.islice(iter(loader), batches):
        out.update(zip(zip(batch["__key__"], batch["_epoch"]), batch["caption"]))
    return out


def test_caption_variant_is_a_pure_draw():
    meta = {"v": ["  a ", "b", "a", 3, "", None, "c"]}
    draws = {caption_variant(meta, "v", 0, "k", epoch) for epoch in range(50)}
    assert draws == {"a", "b", "c"}  # stripped, deduplicated, non-strings and blanks ignored
    assert caption_variant(meta, "v", 0, "k", 4) == caption_variant(dict(meta), "v", 0, "k", 4)
    for unusable in [{}, {"v": "abc"}, {"v": []}, {"v": [1, " "]}, ["v"]]:
        assert caption_variant(unusable, "v", 0, "k", 0) is None


def test_variants_drawn_per_epoch_and_reproducible(variant_shards):
    kw = dict(batch_size=8, shuffle_buffer=10, seed=5, caption_variants_key=VARIANTS_KEY)
    captions = _captions_by_epoch(_loader(variant_shards, **kw), 3 * 64 // 8)  # 3 epochs
    for (key, _), caption in captions.items():
        i = int(key[1:])
        if i % 8 >= 5:
            assert caption in {f"variant a {i}", f"variant b {i}", f"variant c {i}"}
        else:
            assert caption == f"txt {i}"
    changed = [k for (k, e), c in captions.items() if e == 1 and captions.get((k, 0)) not in (None, c)]
    assert changed, "the draw should differ between epochs for some samples"
    assert _captions_by_epoch(_loader(variant_shards, **kw), 3 * 64 // 8) == captions

    plain = _captions_by_epoch(_loader(variant_shards, batch_size=8, shuffle_buffer=10, seed=5), 64 // 8)
    assert all(c == f"txt {int(k[1:])}" for (k, _), c in plain.items())


def _duplicated(tmp_path, copies: int, distinct: int) -> tuple[str, int]:
    """``distinct`` captions, each ``copies`` times, spelled with varying case and spacing; every
    other sample also has a variant list naming the same caption two ways."""
    spellings = ["a red circle number {}", "A Red  Circle number {}", " a red circle NUMBER {} "]
    samples = []
    for i in range(copies * distinct):
        caption = spellings[i % 3].format(i % distinct)
        meta = {VARIANTS_KEY: [caption, f"circle {i % distinct}"]} if i % 2 else {}
        samples.append(_sample(i, caption, meta))
    return _write_shards(tmp_path, samples), len(samples)


def _assert_distinct(batch):
    norm = [caption_norm(c) for c in batch["caption"]]
    assert len(set(norm)) == len(norm), batch["caption"]


def test_unique_captions_every_sample_once_per_epoch(tmp_path):
    pattern, total = _duplicated(tmp_path, copies=2, distinct=48)
    loader = _loader(pattern, batch_size=8, workers=2, shuffle_buffer=20, unique_captions=True)
    seen = Counter()
    for batch in itertools.islice(iter(loader), 3 * total // 8):  # past the end of epoch 0 everywhere
        _assert_distinct(batch)
        assert len(batch["caption"]) == 8
        seen.update(k for k, e in zip(batch["__key__"], batch["_epoch"]) if e == 0)
    assert "duplicate_caption" not in loader.skipped
    assert len(seen) == total and set(seen.values()) == {1}


def test_unique_captions_overflow_is_counted(tmp_path):
    """A caption in most samples overflows the pending list: drops are counted, nothing is lost."""
    samples = [_sample(i, "clip art" if i % 10 < 7 else f"caption {i}") for i in range(120)]
    pattern = _write_shards(tmp_path, samples)
    assert "duplicate_caption" in SKIP_KINDS
    loader = _loader(pattern, batch_size=8, train=False, unique_captions=True)
    batches = list(loader)
    for batch in batches:
        _assert_distinct(batch)
    keys = [k for b in batches for k in b["__key__"]]
    dropped = loader.skipped["duplicate_caption"]
    assert dropped > 0 and len(set(keys)) == len(keys)
    assert len(keys) + dropped == len(samples)
    # the one-pass end flushes the (at most batch_size) pending samples into short distinct batches
    assert sum(len(b["caption"]) < 8 for b in batches) <= 9


def test_unique_captions_with_too_few_captions_stops(tmp_path):
    """Fewer distinct captions than a batch holds: an error after a whole epoch, not an endless loop."""
    pattern = _write_shards(tmp_path, [_sample(i, f"caption {i % 4}") for i in range(32)])
    from vlp.data.usable import DataStopError

    with pytest.raises(DataStopError, match="fewer than 8 distinct captions"):
        next(iter(_loader(pattern, batch_size=8, unique_captions=True)))


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("stop, pending_epoch", [(7, 0), (11, 1)])
def test_unique_captions_resume_restores_pending(tmp_path, workers, stop, pending_epoch):
    pattern, _ = _duplicated(tmp_path, copies=4, distinct=16)
    kw = dict(
        batch_size=8,
        workers=workers,
        shuffle_buffer=20,
        seed=3,
        unique_captions=True,
        caption_variants_key=VARIANTS_KEY,
    )
    full = _take(_loader(pattern, **kw), 14)
    first = _loader(pattern, **kw)
    head = _take(first, stop)
    state = first.state_dict()
    pending = [origin for slot in state["slots"].values() for origin in slot["pending"]]
    assert pending_epoch in {epoch for _, epoch, _ in pending}, "the save point should have pending samples"
    tail = _take(_loader(pattern, state=state, **kw), 14 - stop)
    for a, b in zip(full, head + tail, strict=True):
        _assert_distinct(a)
        assert a["__key__"] == b["__key__"] and a["caption"] == b["caption"] and a["_epoch"] == b["_epoch"]
        assert torch.equal(a["text"], b["text"])
        assert torch.equal(a["image"], b["image"])  # augmentation of re-read pending samples replayed too


def test_samples_sharing_their_own_caption_never_meet_even_with_other_variants(tmp_path):
    """Eight "star" samples whose drawn variants all differ: their own captions still clash."""
    samples = [_sample(i, "star" if i < 8 else f"thing {i}", {VARIANTS_KEY: [f"star number {i}"]}) for i in range(40)]
    pattern = _write_shards(tmp_path, samples)
    loader = _loader(pattern, batch_size=8, unique_captions=True, caption_variants_key=VARIANTS_KEY)
    for batch in itertools.islice(iter(loader), 10):
        stars = [k for k in batch["__key__"] if int(k[1:]) < 8]
        assert len(stars) <= 1, batch["__key__"]
        assert all(c.startswith("star number") for c in batch["caption"])  # the variants were drawn
