"""The WebDataset stream: shards -> readers -> shuffle -> mix -> decode -> augment -> batch.

Determinism and exact resume: every random choice (shard order, shuffle buffer, source mixing,
augmentation) is seeded from (seed, reader, epoch, position), never from process state. Each
batch carries the position of its reader after it was made (``_state``); the training process
keeps the position of the last batch it *consumed* from each reader, and a resumed run replays
every reader to that position (reading tar bytes, no decoding) and rotates the reader slots so
the DataLoader's round-robin continues with the same reader. A resumed run therefore sees
exactly the batches an uninterrupted run would have seen.

With ``unique_captions`` a sample whose caption is already in the batch waits for a later batch;
``_state`` then also lists where each waiting sample was read ((source, epoch, position in that
reader's epoch stream)), and a resumed run re-reads exactly those samples from the shards.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import random
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from vlp.data.decode import DecodeOptions, SkipCounter, caption_variant, decode_sample
from vlp.data.extra_captions import PAIR_GROUP_LIMIT, ExtraCaptionSpec, extra_caption_tensors, pair_id
from vlp.data.shardlists import reader_shards
from vlp.data.truncation import count_truncated
from vlp.data.unique_captions import UniqueBatcher, caption_norm  # noqa: F401 - caption_norm: used from here
from vlp.data.usable import DataStopError, NoUsableDataError, UsableGuard

log = logging.getLogger(__name__)


@dataclass
class StreamSpec:
    """What to stream: ``sources`` are lists of shard urls mixed with ``weights``."""

    sources: list[list[str]]
    batch_size: int
    weights: list[float] = field(default_factory=list)
    seed: int = 0
    rank: int = 0
    world: int = 1
    resampled: bool = False
    shuffle_buffer: int = 1000
    infinite: bool = True  # False: one pass over epoch 0, partial last batch kept (evaluation)
    decode: DecodeOptions = field(default_factory=DecodeOptions)
    caption_variants_key: str = ""  # json field of alternative captions, one drawn per epoch ("" = off)
    unique_captions: bool = False  # no two equal captions in one batch (see vlp.data.unique_captions)
    extras: ExtraCaptionSpec = field(default_factory=ExtraCaptionSpec)  # hard negatives, counterfactuals
    max_unusable: int = 10_000  # unusable samples in a row before a reader's first usable one: stop (vlp.data.usable)


def _truncated(url: str) -> bool:
    """A complete tar ends in zero blocks and has a size that is a multiple of 512 bytes.

    Python's tarfile treats a file cut at a header boundary as a shorter valid archive, so a
    truncated local shard is detected here; for remote urls only read errors are seen. A gzip
    file (``.tar.gz``, ``.tgz``, recognised by its magic bytes) is not checked here: its own
    trailer (length and CRC) makes a cut stream fail while it is read, and the tar reader counts that.
    """
    if "://" in url or url.startswith("pipe:") or not os.path.isfile(url):
        return False
    size = os.path.getsize(url)
    with open(url, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return False
        if size < 1024 or size % 512:
            return True
        f.seek(size - 1024)
        return f.read(1024).count(0) != 1024


def _shard_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Samples of one tar shard. Damage is counted once per damaged region (``shard_error``) and
    reading resumes at the next intact member (:mod:`vlp.data.tar_reader`), so only the damaged
    samples are lost; a shard that cannot be opened is counted once."""
    from webdataset.gopen import gopen

    from vlp.data.tar_reader import tar_samples

    truncated = _truncated(url)
    if truncated:
        skips.add("shard_error", url, "truncated: no end-of-archive marker")

    def on_damage(offset: int, why: str) -> None:
        if not (truncated and why.startswith("truncated")):
            skips.add("shard_error", url, f"{why} (byte {offset})" if offset >= 0 else why)

    try:
        stream = gopen(url)
    except Exception as exn:  # noqa: BLE001 - any failure of a shard is data, not a bug
        skips.add("shard_error", url, repr(exn))
        return
    finished = False
    try:
        yield from tar_samples(stream, url, on_damage)
        finished = True
    except OSError as exn:  # a read error of the file or pipe
        skips.add("shard_error", url, repr(exn))
    finally:
        if finished:
            stream.close()
        else:
            _abandon(stream)


def _abandon(stream) -> None:
    """Close a shard left before its end (a stop signal, an error, a closed loader) without waiting:
    a ``pipe:`` command still running (a download, a stalled read) is killed, not awaited (webdataset's
    close would wait for it, for hours if it hangs)."""
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):  # the killed command's exit status, or a stream already broken
        stream.close()


def pair_units(raw: Iterator[dict]) -> Iterator[list[dict]]:
    """Raw samples as shuffle units: consecutive samples with the same minimal-pair id (their JSON's
    ``pair``, :func:`vlp.data.extra_captions.pair_id`), at most PAIR_GROUP_LIMIT, make one unit, so
    a shuffle buffer moves a pair or group as a whole and its members stay side by side; any other
    sample is a unit of its own (one more with the same id starts a new unit). Metadata that is not
    JSON gives no id here (decoding counts it later).

    Each sample gets ``_unit``: the serial of its unit in this stream (0, 1, ...), or -1 for a sample
    with no id. The batch's ``pair_id`` is made from it (:func:`vlp.data.extra_captions.source_pair_id`),
    so a JSON id used again elsewhere in the data (numbering restarted in every shard) never joins
    unrelated samples."""
    unit, unit_id, serial = [], -1, 0

    def stamped(unit: list[dict], unit_id: int, serial: int) -> list[dict]:
        for s in unit:
            s["_unit"] = serial if unit_id >= 0 else -1
        return unit

    for sample in raw:
        try:
            meta = json.loads(sample["json"]) if "json" in sample else None
        except ValueError:
            meta = None
        sid = pair_id({"json": meta})
        if unit and (sid < 0 or sid != unit_id or len(unit) == PAIR_GROUP_LIMIT):
            yield stamped(unit, unit_id, serial)
            unit, serial = [], serial + 1
        unit.append(sample)
        unit_id = sid
    if unit:
        yield stamped(unit, unit_id, serial)


class _SourceReader:
    """Raw samples of one source for one reader, epoch after epoch, from a replayable position.

    ``guard`` (:class:`vlp.data.usable.UsableGuard`, training streams) hears of shards that give no
    sample and of finished epochs, as source ``source``."""

    def __init__(self, urls, spec: StreamSpec, reader: int, readers: int, skips, epoch=0, consumed=0, guard=None,
                 source=0):  # fmt: skip
        self.urls, self.spec, self.reader, self.readers, self.skips = urls, spec, reader, readers, skips
        self.epoch, self.consumed = epoch, consumed
        self.guard, self.source = guard, source
        self._shards: list[str] = []

    def _read(self, url: str) -> Iterator[dict]:
        n = 0
        for n, sample in enumerate(_shard_samples(url, self.skips), 1):  # noqa: B007 - n counts after the loop
            yield sample
        if n == 0 and self.guard is not None:
            self.guard.empty_shard(url)

    def _epoch_samples(self, epoch: int) -> Iterator[dict]:
        spec = self.spec
        shards = reader_shards(
            self.urls,
            epoch=epoch,
            reader=self.reader,
            readers=self.readers,
            seed=spec.seed,
            resampled=spec.resampled,
            shuffle=spec.infinite,
        )
        self._shards = shards
        raw = (s for url in shards for s in self._read(url))
        # pairs: units of a pair or group, stamped even when not shuffled; otherwise plain samples
        items = pair_units(raw) if spec.extras.pairs else raw
        if spec.shuffle_buffer > 1 and spec.infinite:
            from webdataset.filters import _shuffle

            rng = random.Random(f"samples/{spec.seed}/{self.reader}/{epoch}")
            items = _shuffle(items, bufsize=spec.shuffle_buffer, initial=spec.shuffle_buffer, rng=rng)
        return (sample for unit in items for sample in unit) if spec.extras.pairs else items

    def __iter__(self):
        epoch, skip = self.epoch, self.consumed
        while True:
            for i, raw in enumerate(self._epoch_samples(epoch)):
                if i < skip:
                    continue  # replaying to the resume position: no decode
                self.epoch, self.consumed = epoch, i + 1
                yield raw
            if not self.spec.infinite:
                return
            # every sample of the epoch has been taken (and decoded) before the next one is asked for
            if self.guard is not None:
                self.guard.epoch_done(self.source, self._shards, full=skip == 0)
            epoch, skip = epoch + 1, 0
            self.epoch, self.consumed = epoch, 0


class _Mixer:
    """Draw each sample's source by weight from a seeded generator; replayable by draw count."""

    def __init__(self, sources: list[_SourceReader], weights: list[float], seed: int, reader: int, draws=0):
        self.sources, self.weights, self.draws = sources, weights or [1.0] * len(sources), draws
        self.rng = random.Random(f"mix/{seed}/{reader}")

    def __iter__(self):
        iters = [iter(s) for s in self.sources]
        if len(iters) == 1:
            for raw in iters[0]:
                yield 0, raw
            return
        idx = range(len(iters))
        for _ in range(self.draws):
            self.rng.choices(idx, self.weights)
        while True:
            i = self.rng.choices(idx, self.weights)[0]
            self.draws += 1
            try:
                yield i, next(iters[i])
            except StopIteration:
                return

    def state(self) -> dict:
        return {"sources": [(s.epoch, s.consumed) for s in self.sources], "draws": self.draws}


class ShardStream(IterableDataset):
    """Batches of ``{"image": Bx3xHxW, "text": BxL, "caption": [str], "json": [dict], ...}``
    (``image``: what ``transform`` returns, stacked: uint8 for training, see vlp.data.transforms;
    ``text``: the batch's captions tokenized in one call).

    ``start`` maps a reader slot (worker index) to its saved position; ``slot_offset`` rotates
    which slot DataLoader worker 0 plays (see the module docstring).
    """

    def __init__(self, spec: StreamSpec, transform: Callable, tokenizer: Callable, start=None, slot_offset=0):
        self.spec, self.transform, self.tokenizer = spec, transform, tokenizer
        self.start, self.slot_offset = start or {}, slot_offset

    def __iter__(self):
        info = get_worker_info()
        workers = info.num_workers if info else 1
        slot = ((info.id if info else 0) + self.slot_offset) % workers
        reader, readers = self.spec.rank * workers + slot, self.spec.world * workers
        state = self.start.get(slot) or {"sources": [(0, 0)] * len(self.spec.sources), "draws": 0, "batches": 0}
        skips = SkipCounter()
        guard = self._guard(reader, skips) if self.spec.infinite else None
        readers_ = [
            _SourceReader(urls, self.spec, reader, readers, skips, *state["sources"][i], guard=guard, source=i)
            for i, urls in enumerate(self.spec.sources)
        ]
        mixer = _Mixer(readers_, self.spec.weights, self.spec.seed, reader, state["draws"])
        try:
            yield from self._batches(state, slot, reader, readers_, mixer, skips, guard)
        except DataStopError as e:  # to the training process as data, so that it stops with this one line
            yield {"_fatal": (type(e).__name__, str(e)), "_slot": slot, "_skipped": skips.drain()}

    def _guard(self, reader: int, skips: SkipCounter) -> UsableGuard:
        d = self.spec.decode
        hint = (
            f"check data.image_keys {list(d.image_keys)} and data.text_key '{d.text_key}' against the members, "
            "or the images and captions themselves"
        )
        return UsableGuard(reader, self.spec.sources, skips, self.spec.max_unusable, hint)

    def _batches(self, state, slot, reader, readers_, mixer, skips, guard):
        batcher = None
        if self.spec.unique_captions:
            watch = [r for r, w in zip(readers_, mixer.weights) if w > 0] or readers_
            pending = self._reread(readers_, state.get("pending", []))
            batcher = UniqueBatcher(self.spec.batch_size, skips, pending, watch)
        batches = state["batches"]
        samples = self._samples(mixer, readers_, skips, guard)
        while True:
            # augmentation randomness is a function of (seed, reader, batch index): exact on resume,
            # and isolated from the training process's RNG when loading in-process
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.spec.seed, reader, batches)) & 0x7FFF_FFFF_FFFF)
                if batcher:
                    batch = batcher.fill(samples, self._transform)
                else:
                    batch = [self._transform(s) for s in itertools.islice(samples, self.spec.batch_size)]
            if len(batch) < self.spec.batch_size and self.spec.infinite:
                return
            batches += 1
            position = {**mixer.state(), "batches": batches, **(batcher.state() if batcher else {})}
            if batch or skips.counts:
                yield self._collate(batch, slot, position, skips.drain())
            # one pass: short batches of distinct captions flush what is pending after the last sample
            if len(batch) < self.spec.batch_size and not (batcher and batcher.pending):
                return

    def _samples(self, mixer, readers, skips, guard=None):
        for i, raw in mixer:
            # the reader has just counted this sample: its position is one before its count
            sample = self._decode(raw, (i, readers[i].epoch, readers[i].consumed - 1), skips)
            if guard is not None:
                guard.unusable(raw) if sample is None else guard.usable()
            if sample is not None:
                yield sample

    def _decode(self, raw: dict, origin: tuple[int, int, int], skips: SkipCounter) -> dict | None:
        """Decode, tag with (source, epoch, position) and draw the caption variant of this epoch."""
        sample = decode_sample(raw, self.spec.decode, skips)
        if sample is None:
            return None
        sample["_epoch"], sample["_origin"] = origin[1], tuple(origin)
        if "_unit" in raw:
            sample["_unit"] = raw["_unit"]
        own = sample["_own"] = sample["text"]
        if self.spec.caption_variants_key:
            key, seed = sample["__key__"], self.spec.seed
            variant = caption_variant(sample["json"], self.spec.caption_variants_key, seed, key, origin[1])
            sample["text"] = variant or sample["text"]
        # two samples clash when their drawn captions or their own captions are equal: samples that
        # share a caption usually share all their variants ("a drawing of X" for both)
        sample["_caption_keys"] = {caption_norm(sample["text"]), caption_norm(own)}
        return sample

    def _reread(self, readers: list[_SourceReader], origins: list) -> list[dict]:
        """The samples read at ``origins`` ((source, epoch, position)), decoded again, in order.

        Each needed epoch stream is read again up to the last position wanted (tar bytes only; just
        the wanted samples are decoded). Skips are not counted again: they were counted when the
        samples were first read.
        """
        wanted: dict[tuple[int, int], set[int]] = {}
        for src, epoch, pos in origins:
            wanted.setdefault((src, epoch), set()).add(pos)
        quiet = SkipCounter(examples_per_kind=0)
        found = {}
        for (src, epoch), positions in wanted.items():
            r = readers[src]
            stream = _SourceReader(r.urls, self.spec, r.reader, r.readers, quiet)._epoch_samples(epoch)
            for pos, raw in enumerate(itertools.islice(stream, max(positions) + 1)):
                if pos in positions:
                    found[(src, epoch, pos)] = self._decode(raw, (src, epoch, pos), quiet)
        samples = [found.get(tuple(o)) for o in origins]
        if None in samples:
            log.warning("%d pending sample(s) could not be read again: have the shards changed?", samples.count(None))
        return [s for s in samples if s is not None]

    def _transform(self, sample):
        sample["image"] = self.transform(sample["image"])
        return sample

    def _collate(self, samples, slot, state, skipped) -> dict:
        captions = [s["text"] for s in samples]
        # default_collate stacks straight into shared memory in a worker: no copy on the way to the main process
        images = default_collate([s["image"] for s in samples]) if samples else torch.empty(0, dtype=torch.uint8)
        extras = self.spec.extras
        text = self.tokenizer(captions) if samples else torch.empty(0, dtype=torch.long)
        extra = extra_caption_tensors(samples, self.tokenizer, extras) if extras.active else {}
        if extras.sources:
            extra["_neg_sources"], extras.sources = dict(extras.sources), type(extras.sources)()
        return {
            **extra,
            "image": images,
            "text": text,
            "caption": captions,
            "json": [s["json"] for s in samples],
            "__key__": [s["__key__"] for s in samples],
            "_epoch": [s["_epoch"] for s in samples],
            "_slot": slot,
            "_state": state,
            "_skipped": skipped,
            "_truncated": count_truncated(self.tokenizer, captions, text) if samples else 0,
        }


def _worker_init(_):
    torch.set_num_threads(1)  # workers decode; the training process owns the cores' BLAS threads
    # Ctrl-C reaches the whole process group: the training process decides (finish the step,
    # checkpoint, stop its workers); a worker that died of it would fail the run instead
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class StreamLoader:
    """Iterates a ShardStream through a DataLoader, tracking the position and skipped data.

    Epochs live inside each reader's one endless iteration, so training iterates a StreamLoader
    once. Workers are persistent: iterating again reuses them instead of starting new processes,
    and, as before, every reader starts again from the position the loader was built with (the
    tracked position is reset with it); ``close()`` stops them (the trainer does when training
    ends). Batches are pinned when CUDA is available; each worker keeps 4 batches prefetched.
    """

    def __init__(self, spec: StreamSpec, transform, tokenizer, workers: int, state: dict | None = None):
        self.spec, self.workers = spec, workers
        nslots = max(workers, 1)
        self.slots: dict[int, dict] = {}
        self.next_slot = 0
        self.skipped: Counter = Counter()
        self.truncated_captions = 0  # captions longer than the context, cut by the tokenizer
        self.negative_sources: Counter = Counter()  # hard negatives by origin: shard, online, fallback
        if state:
            self._restore(state, nslots)
        self.dataset = ShardStream(spec, transform, tokenizer, dict(self.slots), self.next_slot)
        self._built_at = dict(self.slots), self.next_slot
        self._loader = DataLoader(
            self.dataset,
            batch_size=None,
            num_workers=workers,
            worker_init_fn=_worker_init if workers else None,
            pin_memory=torch.cuda.is_available(),
            prefetch_factor=4 if workers else None,
            persistent_workers=workers > 0,
        )

    def _restore(self, state: dict, nslots: int) -> None:
        self.skipped.update(state.get("skipped", {}))
        self.truncated_captions = int(state.get("truncated_captions", 0))
        if state.get("workers") == nslots and state.get("world") == self.spec.world:
            self.slots = {int(k): v for k, v in state["slots"].items()}
            self.next_slot = int(state["next_slot"])
            return
        epochs = [src[0] for v in state.get("slots", {}).values() for src in v["sources"]]
        epoch = max(epochs, default=0) + 1
        log.warning(
            "data position was saved with %s rank(s) x %s worker(s); now %s x %s: it cannot be replayed "
            "exactly, so every reader starts epoch %d",
            state.get("world"),
            state.get("workers"),
            self.spec.world,
            nslots,
            epoch,
        )
        fresh = {"sources": [(epoch, 0)] * len(self.spec.sources), "draws": 0, "batches": 0}
        self.slots = {s: fresh for s in range(nslots)}

    def __iter__(self):
        nslots = max(self.workers, 1)
        if self._loader is None:
            raise RuntimeError("this StreamLoader was closed")
        self.slots, self.next_slot = dict(self._built_at[0]), self._built_at[1]
        for batch in self._loader:
            if "_fatal" in batch:  # a reader cannot go on (vlp.data.usable): stop here, with its message
                self.skipped.update(batch["_skipped"])
                kind, message = batch["_fatal"]
                self.close()  # the other readers' workers too: nothing will read from them again
                raise (NoUsableDataError if kind == "NoUsableDataError" else DataStopError)(message)
            self.truncated_captions += batch.pop("_truncated")
            self.slots[batch.pop("_slot")] = batch.pop("_state")
            self.next_slot = (self.next_slot + 1) % nslots
            self.skipped.update(batch.pop("_skipped"))
            self.negative_sources.update(batch.pop("_neg_sources", {}))
            if len(batch["caption"]) == 0:
                continue  # a reader's last message carried only skip counts
            yield batch

    def close(self) -> None:
        """Stop the worker processes now; persistent ones otherwise live as long as the loader
        (with their shuffle buffers and prefetched batches). The position stays readable."""
        loader, self._loader = self._loader, None
        iterator = getattr(loader, "_iterator", None)  # DataLoader keeps its persistent workers' iterator here
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()

    def state_dict(self) -> dict:
        return {
            "world": self.spec.world,
            "workers": max(self.workers, 1),
            "next_slot": self.next_slot,
            "slots": {str(k): v for k, v in self.slots.items()},
            "skipped": dict(self.skipped),
            "truncated_captions": self.truncated_captions,
        }
