"""Fuzzing the input paths: captions (tokenizer, negative generator, count parser) with hypothesis,
and shard bytes (truncated, garbled, hostile names) with a seeded mutator. Nothing may crash; every
intact sample must come through; every damaged one is skipped and counted."""

from __future__ import annotations

import io
import random
import tarfile

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import good_sample, write_tar
from vlp.data.counting import counterfactual, find_counts
from vlp.data.decode import DecodeOptions, SkipCounter, decode_sample
from vlp.data.negatives import TYPES, generate
from vlp.data.stream import _shard_samples

# random Unicode (control characters, surrogates excluded by UTF-8 text), long and empty strings
CAPTIONS = st.one_of(
    st.text(max_size=200),
    st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x3000), max_size=2000),
    st.just(""),
    st.builds(
        lambda w, n: " ".join([w] * n), st.sampled_from(["two dogs", "a red", "\x00", "🐕"]), st.integers(0, 3000)
    ),
)
SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def tokenizer():
    from vlp.models.tokenizer import get_tokenizer

    return get_tokenizer("debug")


@SETTINGS
@given(caption=CAPTIONS)
def test_tokenizer_never_crashes_and_is_bounded(tokenizer, caption):
    ids = tokenizer([caption])
    assert tuple(ids.shape) == (1, 32)  # the debug model's context length, whatever the input


@SETTINGS
@given(caption=CAPTIONS, seed=st.integers(0, 2**31), k=st.integers(0, 6))
def test_negative_generator_never_crashes_and_is_bounded(caption, seed, k):
    out = generate(caption, list(TYPES), k, seed)
    assert len(out) <= k
    for text, kind in out:
        assert kind in TYPES and text.strip() and text.strip().lower() != caption.strip().lower()
        assert len(text) <= 2 * len(caption) + 64  # edits, never growth without bound


@SETTINGS
@given(caption=CAPTIONS, seed=st.integers(0, 2**31))
def test_count_parser_never_crashes_and_is_bounded(caption, seed):
    counts = find_counts(caption)
    assert len(counts) <= len(caption.split())  # at most one count per word
    assert all(
        0 <= start < end <= len(caption) and isinstance(value, int) and value >= 0 for start, end, value in counts
    )
    cf = counterfactual(caption, random.Random(seed))
    assert cf is None or (cf != caption and len(cf) <= len(caption) + 16)


# ---- shard bytes ------------------------------------------------------------------------------

N = 24


def _shard(tmp_path):
    samples = [good_sample(f"s{i:03d}", f"caption {i}") for i in range(N)]
    path = write_tar(tmp_path / "clean.tar", samples)
    # every member's byte range (header + data); a sample is intact if the mutation misses all of its
    ranges = {}
    with tarfile.open(path) as tar:
        for m in tar.getmembers():
            key = m.name.split(".")[0]
            end = m.offset_data + (m.size + 511) // 512 * 512
            lo, hi = ranges.get(key, (m.offset, end))
            ranges[key] = (min(lo, m.offset), max(hi, end))
    return path.read_bytes(), ranges


def _read(data: bytes, tmp_path, name="mutated.tar"):
    path = tmp_path / name
    path.write_bytes(data)
    skips = SkipCounter()
    good = []
    for raw in _shard_samples(str(path), skips):
        sample = decode_sample(raw, DecodeOptions(), skips)
        if sample is not None:
            assert sample["image"].size == (32, 32) and isinstance(sample["text"], str) and sample["text"].strip()
            good.append(sample["__key__"])
    return good, skips.counts


def _mutations(size: int, rng: random.Random):
    """(name, function(bytes) -> bytes, damaged byte range) triples."""
    for _ in range(12):
        cut = rng.randrange(1, size)
        yield "truncate", lambda b, c=cut: b[:c], (cut, size)
    for _ in range(12):
        at, n = rng.randrange(0, size - 1), rng.choice([1, 7, 512, 2000])
        junk = bytes(rng.randrange(256) for _ in range(n))
        yield "garble", lambda b, a=at, j=junk: b[:a] + j[: len(b) - a] + b[a + len(j) :], (at, at + n)
    for _ in range(12):
        at = rng.randrange(0, size)
        yield "flip", lambda b, a=at: b[:a] + bytes([b[a] ^ 0xFF]) + b[a + 1 :], (at, at + 1)


def test_mutated_shards_lose_no_intact_sample(tmp_path):
    clean, ranges = _shard(tmp_path)
    good, counts = _read(clean, tmp_path, "clean-copy.tar")
    assert good == [f"s{i:03d}" for i in range(N)] and not counts
    rng = random.Random(0)
    tried = lost = 0
    for kind, mutate, (lo, hi) in _mutations(len(clean), rng):
        data = mutate(clean)
        good, counts = _read(data, tmp_path)
        intact = {k for k, (a, b) in ranges.items() if b <= lo or a >= hi}
        missing = intact - set(good)
        tried += 1
        lost += len(missing)
        assert not missing, (kind, lo, hi, sorted(missing), counts)
        damaged = set(ranges) - intact
        if damaged - set(good):  # something was lost: it was counted
            assert sum(counts.values()) >= 1, (kind, lo, hi, counts)
    assert tried == 36 and lost == 0


def test_hostile_member_names_are_keys_never_paths(tmp_path):
    buf = io.BytesIO()
    sample = good_sample("x")
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name in ("/etc/evil.png", "../../outside.png", "../../outside.txt", "ok/../../y.png"):
            data = sample["png"] if name.endswith("png") else b"a caption"
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    before = set(tmp_path.parent.iterdir())
    (tmp_path / "deep").mkdir()
    good, counts = _read(buf.getvalue(), tmp_path / "deep", "hostile.tar")
    assert "../../outside" in good  # read as a key, in memory
    assert set(tmp_path.parent.iterdir()) == before and not (tmp_path / "outside.png").exists()
    assert counts["missing_caption"] == 2  # the other two samples have no caption
