"""The WebDataset stream: exact rank x worker split, mixing weights, bad data, exact resume."""

from __future__ import annotations

import itertools
from collections import Counter

import open_clip
import pytest
import torch

from tests.conftest import BAD_SAMPLES, good_sample, write_tar
from vlp.data.decode import DecodeOptions
from vlp.data.shardlists import DataConfigError, check_readers, expand_urls, read_sizes
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.transforms import eval_transform, train_transform
from vlp.models.tokenizer import get_tokenizer

MEAN, STD = open_clip.OPENAI_DATASET_MEAN, open_clip.OPENAI_DATASET_STD


def _loader(pattern, *, batch_size=8, rank=0, world=1, workers=0, state=None, train=True, **kw):
    spec = StreamSpec(
        sources=[expand_urls(p) for p in ([pattern] if isinstance(pattern, str) else pattern)],
        batch_size=batch_size,
        rank=rank,
        world=world,
        infinite=train,
        **kw,
    )
    tf = train_transform(64) if train else eval_transform(64, MEAN, STD)
    return StreamLoader(spec, tf, get_tokenizer("debug"), workers, state)


def test_expand_urls_and_sizes(shapes_shards):
    urls = expand_urls(shapes_shards["train"])
    assert len(urls) == 8
    assert read_sizes(urls) == 256
    with pytest.raises(DataConfigError, match="shard file not found.*nope"):
        expand_urls("/tmp/nope-{0..1}.tar")
    with pytest.raises(DataConfigError, match="8 shard.*3 rank.*3 worker.*resampled"):
        check_readers(urls, world=3, workers=3, resampled=False, key="data.train_shards")


def test_batch_layout(shapes_shards):
    batch = next(iter(_loader(shapes_shards["train"], batch_size=4)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8  # normalised on the device
    assert batch["text"].shape == (4, 32) and batch["text"].dtype == torch.long
    assert len(batch["caption"]) == len(batch["json"]) == 4
    assert all("groups" in m for m in batch["json"])


def test_every_sample_once_per_epoch_2_ranks_2_workers(shapes_shards):
    """Non-resampled: over 2 ranks x 2 workers, epoch 0 covers every sample exactly once."""
    seen = Counter()
    for rank in range(2):
        loader = _loader(shapes_shards["train"], batch_size=8, rank=rank, world=2, workers=2)
        # 3 epochs' worth of batches on this rank, so every reader has passed the end of epoch 0
        for batch in itertools.islice(iter(loader), 3 * 256 // (8 * 2)):
            seen.update(k for k, e in zip(batch["__key__"], batch["_epoch"]) if e == 0)
    assert len(seen) == 256
    assert set(seen.values()) == {1}


def test_source_weights_hold(tmp_path):
    for name, n in [("a", 40), ("b", 40)]:
        for s in range(2):
            write_tar(tmp_path / f"{name}-{s}.tar", [good_sample(f"{name}{s}_{i:03d}") for i in range(n)])
    loader = _loader(
        [str(tmp_path / "a-{0..1}.tar"), str(tmp_path / "b-{0..1}.tar")],
        batch_size=50,
        weights=[3.0, 1.0],
        shuffle_buffer=10,
    )
    keys = [k for b in itertools.islice(iter(loader), 40) for k in b["__key__"]]
    frac_a = sum(k.startswith("a") for k in keys) / len(keys)
    assert abs(frac_a - 0.75) < 0.03, frac_a


@pytest.mark.parametrize("workers", [0, 2])
def test_bad_data_skipped_and_counted(bad_shards, workers):
    loader = _loader(
        bad_shards["pattern"],
        batch_size=4,
        workers=workers,
        train=False,
        decode=DecodeOptions(max_image_pixels=200 * 200),
    )
    keys = [k for b in loader for k in b["__key__"]]
    good = [k for k in keys if k.startswith("g")]
    assert sorted(good) == sorted([f"g{i:03d}" for i in range(24)] + ["g100", "g101"])
    assert not any(k.startswith("b_") for k in keys)
    assert all(k.startswith(("g", "t")) for k in keys)  # t*: samples before the truncation point
    skipped = dict(loader.skipped)
    expected = {kind: 1 for kind in BAD_SAMPLES}
    expected["corrupt_image"] = 2  # the broken PNG and the zero-byte one
    expected["shard_error"] = 1  # the truncated tar, counted once
    assert skipped == expected


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_replays_the_same_batches(shapes_shards, workers):
    """Stopping after k batches and resuming from the saved state continues the exact sequence."""
    kw = dict(batch_size=8, workers=workers, shuffle_buffer=50, seed=3)
    full = _take(_loader(shapes_shards["train"], **kw), 13)
    first = _loader(shapes_shards["train"], **kw)
    head = _take(first, 7)
    state = first.state_dict()
    tail = _take(_loader(shapes_shards["train"], state=state, **kw), 6)
    for a, b in zip(full, head + tail):
        assert a["__key__"] == b["__key__"]
        assert torch.equal(a["image"], b["image"])  # augmentation replayed too


def test_resume_with_other_worker_count_starts_next_epoch(shapes_shards, caplog):
    first = _loader(shapes_shards["train"], batch_size=8, workers=0)
    _take(first, 3)
    resumed = _loader(shapes_shards["train"], batch_size=8, workers=2, state=first.state_dict())
    batch = next(iter(resumed))
    assert set(batch["_epoch"]) == {1}
    assert "cannot be replayed exactly" in caplog.text


def test_eval_stream_is_one_ordered_pass(shapes_shards):
    loader = _loader(shapes_shards["val"], batch_size=10, train=False, workers=0)
    batches = list(loader)
    assert [len(b["caption"]) for b in batches] == [10] * 6 + [4]
    keys = [k for b in batches for k in b["__key__"]]
    assert keys == sorted(keys)


@pytest.mark.parametrize("cut", [0.3, 0.5, 0.77, 0.999])
def test_truncated_shard_counted_once_complete_samples_kept(tmp_path, cut):
    from vlp.data.decode import SkipCounter
    from vlp.data.stream import _shard_samples

    full = write_tar(tmp_path / "full.tar", [good_sample(f"t{i:03d}") for i in range(8)])
    data = full.read_bytes()
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(data[: int(len(data) * cut)])
    skips = SkipCounter()
    samples = list(_shard_samples(str(cut_path), skips))
    assert skips.counts == {"shard_error": 1}
    complete = [s for s in samples if {"png", "txt", "json"} <= set(s)]
    assert [s["__key__"] for s in complete] == [f"t{i:03d}" for i in range(len(complete))]
    skips = SkipCounter()
    assert len(list(_shard_samples(str(full), skips))) == 8 and not skips.counts
