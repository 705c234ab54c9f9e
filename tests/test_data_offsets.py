"""Byte offsets in the data position: a resumed stream seeks (files) or range-reads (http) instead of
reading the epoch again, and sees batch for batch what a re-reading resume and an uninterrupted run see."""

from __future__ import annotations

import gzip
import io
import itertools
import json
import random
import tarfile
from pathlib import Path

import pytest
import torch

from tests.conftest import good_sample, write_tar
from tests.range_server import serve
from vlp.data.decode import SkipCounter
from vlp.data.epoch_stream import EpochStream, unpack_items
from vlp.data.shard_io import samples_at, shard_samples
from vlp.data.shardlists import expand_urls
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.tar_reader import located_samples, tar_samples
from vlp.data.transforms import train_transform
from vlp.models.tokenizer import get_tokenizer


def _text_sample(key: str, pair: int | None = None) -> dict:
    meta = {"k": key} if pair is None else {"k": key, "pair": pair}
    return {"__key__": key, "txt": f"caption {key}".encode(), "json": json.dumps(meta).encode()}


def _shards(folder: Path, n_shards=4, per_shard=24, pairs=False, image=True) -> str:
    """``n_shards`` shards; with ``pairs`` runs of 1-3 samples share a JSON pair id."""
    folder.mkdir(parents=True, exist_ok=True)
    rng, pair, left = random.Random(0), 0, 0
    for s in range(n_shards):
        samples = []
        for i in range(per_shard):
            if left == 0:
                pair, left = pair + 1, rng.choice([1, 2, 3])
            left -= 1
            key = f"s{s}_{i:03d}"
            sample = good_sample(key, f"caption {s} {i}") if image else _text_sample(key)
            if pairs:
                sample["json"] = json.dumps({"k": key, "pair": pair % 50}).encode()
            samples.append(sample)
        write_tar(folder / f"shard-{s:06d}.tar", samples)
    return str(folder / f"shard-{{000000..{n_shards - 1:06d}}}.tar")


# ---------------------------------------------------------------------------------------------
# spans of the tar reader


def test_spans_read_back_each_sample_long_names_included(tmp_path):
    path = tmp_path / "long.tar"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for i in range(5):
            key = ("deep/" * 30 if i % 2 else "") + f"k{i}"  # a GNU long-name record before every other member
            for ext, data in (("txt", f"caption {i}".encode()), ("json", b"{}")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    with open(path, "rb") as f:
        located = list(located_samples(f, str(path), lambda *_: None))
    assert len(located) == 5
    again = samples_at(str(path), [(start, end) for _, start, end in located])
    assert again == [sample for sample, _, _ in located]
    with open(path, "rb") as f:  # reading on from a sample's end gives the samples after it
        f.seek(located[2][2])
        rest = [s for s, _, _ in located_samples(f, str(path), lambda *_: None, base=located[2][2])]
    assert rest == [s for s, _, _ in located[3:]]


def test_gzip_shards_have_no_spans(tmp_path):
    plain = write_tar(tmp_path / "a.tar", [_text_sample(f"k{i}") for i in range(4)])
    packed = tmp_path / "a.tar.gz"
    packed.write_bytes(gzip.compress(plain.read_bytes()))
    spans = [(start, end) for _, start, end in shard_samples(str(packed), SkipCounter())]
    assert spans == [(None, None)] * 4


# ---------------------------------------------------------------------------------------------
# the epoch stream: the same samples as webdataset's shuffle, and restored from any position


def _epoch(urls, pairs=False, bufsize=10, seed=5, position=None):
    options = {"pairs": pairs, "bufsize": bufsize, "rng": random.Random(f"samples/{seed}")}
    if position is None:
        return EpochStream(urls, SkipCounter(), **options)
    return EpochStream.restored(urls, SkipCounter(), position, **options)


def test_the_shuffle_is_webdatasets(tmp_path):
    from webdataset.filters import _shuffle

    urls = expand_urls(_shards(tmp_path, image=False))
    raw = (s for u in urls for s in tar_samples(open(u, "rb"), u, lambda *_: None))  # noqa: SIM115
    theirs = [s["__key__"] for s in _shuffle(raw, bufsize=10, initial=10, rng=random.Random("samples/5"))]
    assert [s["__key__"] for s in _epoch(urls)] == theirs


@pytest.mark.parametrize("pairs", [False, True])
def test_restored_from_any_position_hands_out_the_rest(tmp_path, pairs):
    urls = expand_urls(_shards(tmp_path, n_shards=3, per_shard=12, pairs=pairs, image=False))
    full = list(_epoch(urls, pairs))
    assert len(full) == 36
    for cut in range(len(full) + 1):
        stream = _epoch(urls, pairs)
        head = list(itertools.islice(stream, cut))
        position = json.loads(json.dumps(stream.position()))  # what a checkpoint keeps, lists for tuples
        tail = list(_epoch(urls, pairs, position=position))
        assert head + tail == full, cut  # the whole dicts: bytes, url, span and pair-unit stamp


# ---------------------------------------------------------------------------------------------
# the stream: seek, re-read and uninterrupted see the same batches


def _loader(pattern, state=None, workers=0, **kw):
    options = {"batch_size": 8, "shuffle_buffer": 20, "seed": 3, **kw}
    spec = StreamSpec(sources=[expand_urls(pattern)], **options)
    return StreamLoader(spec, train_transform(32), get_tokenizer("debug"), workers, state)


def _take(loader, n):
    it = iter(loader)
    batches = [next(it) for _ in range(n)]
    loader.close()
    return batches


def reread(state: dict) -> dict:
    """``state`` as a vlp without byte offsets saved it: resumed by reading again."""
    slots = {
        k: {n: v for n, v in slot.items() if n not in ("seek", "pending_at")} for k, slot in state["slots"].items()
    }
    return {**state, "slots": slots}


def assert_same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x["__key__"] == y["__key__"] and x["_epoch"] == y["_epoch"]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["text"], y["text"])


def resumes_agree(pattern, stop, total, workers=0, **kw) -> dict:
    """Uninterrupted, seek-resumed and re-read-resumed streams agree batch for batch; the saved state."""
    full = _take(_loader(pattern, workers=workers, **kw), total)
    first = _loader(pattern, workers=workers, **kw)
    head = _take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))  # through a text format: tuples become lists
    seek = _take(_loader(pattern, state, workers, **kw), total - stop)
    again = _take(_loader(pattern, reread(state), workers, **kw), total - stop)
    assert_same(full, head + seek)
    assert_same(full, head + again)
    return state


@pytest.mark.parametrize("workers", [0, 2])
def test_local_resume_seeks_and_matches(tmp_path, workers):
    pattern = _shards(tmp_path)
    state = resumes_agree(pattern, stop=7, total=13, workers=workers)  # the second epoch included
    positions = [p for slot in state["slots"].values() for p in slot["seek"]]
    assert positions and all(p is not None and p["buffer"] for p in positions)


def test_pairs_and_distinct_captions_resume_by_spans(tmp_path):
    pattern = _shards(tmp_path, pairs=True)
    for i in range(2):  # repeated captions, so that samples wait for a later batch
        write_tar(tmp_path / f"dup-{i}.tar", [good_sample(f"d{i}_{k:02d}", "the same caption") for k in range(12)])
    patterns = [pattern, str(tmp_path / "dup-{0..1}.tar")]
    spec = {"unique_captions": True, "weights": [1.0, 1.0]}
    full = _take(_stream(patterns, **spec), 12)
    first = _stream(patterns, **spec)
    head = _take(first, 6)
    state = json.loads(json.dumps(first.state_dict()))
    slot = state["slots"]["0"]
    assert slot["pending"] and all(at is not None for at in slot["pending_at"])
    assert_same(full, head + _take(_stream(patterns, state, **spec), 6))
    assert_same(full, head + _take(_stream(patterns, reread(state), **spec), 6))


def _stream(patterns, state=None, **kw):
    from vlp.data.extra_captions import ExtraCaptionSpec

    spec = StreamSpec(
        sources=[expand_urls(p) for p in patterns],
        batch_size=8,
        shuffle_buffer=10,
        seed=1,
        extras=ExtraCaptionSpec(pairs=True),
        **kw,
    )
    return StreamLoader(spec, train_transform(32), get_tokenizer("debug"), 0, state)


@pytest.mark.parametrize("ranges", [True, False])
def test_http_resume_range_reads_and_matches(tmp_path, ranges):
    _shards(tmp_path)
    with serve(tmp_path, ranges) as (root, sent):
        pattern = root + "/shard-{000000..000003}.tar"
        # one reader: stop late in the epoch (80 of 96 samples) and count the bytes each resume fetches
        state = resumes_agree(pattern, stop=10, total=12)
        assert state["slots"]["0"]["seek"][0] is not None
        sent[0] = 0
        _take(_loader(pattern, state), 1)
        seeking = sent[0]
        sent[0] = 0
        _take(_loader(pattern, reread(state)), 1)
        reading = sent[0]
    if ranges:  # a server that ignores Range sends whole files: still right, not cheaper
        assert seeking < reading / 2, (seeking, reading)


def test_pipe_shards_resume_by_reading_again(tmp_path):
    _shards(tmp_path, n_shards=2)
    pattern = "pipe:cat " + str(tmp_path / "shard-{000000..000001}.tar")
    state = resumes_agree(pattern, stop=3, total=6)
    assert state["slots"]["0"]["seek"] == [None]


def test_a_shard_changed_at_resume_is_counted_not_fatal(tmp_path):
    pattern = _shards(tmp_path, n_shards=2)
    first = _loader(pattern)
    _take(first, 2)
    state = first.state_dict()
    shard = unpack_items(state["slots"]["0"]["seek"][0]["buffer"])[0][0][0]  # where a buffered sample was read
    order = expand_urls(pattern)
    random.Random("shards/3/0").shuffle(order)  # the epoch's shard order (vlp.data.shardlists)
    Path(order[shard]).write_bytes(b"")  # emptied: its buffered samples cannot be read again
    resumed = _loader(pattern, state)
    assert len(_take(resumed, 2)) == 2
    assert resumed.skipped["shard_error"] >= 1
