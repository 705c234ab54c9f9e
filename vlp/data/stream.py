"""The WebDataset stream: shards -> readers -> shuffle -> mix -> decode -> augment -> batch.

Determinism and exact resume: every random choice (shard order, shuffle buffer, source mixing,
augmentation) is seeded from (seed, reader, epoch, position), never from process state. Each
batch carries the position of its reader after it was made (``_state``); the training process
keeps the position of the last batch it *consumed* from each reader, and a resumed run rotates the
reader slots so the DataLoader's round-robin continues with the same reader. A resumed run
therefore sees exactly the batches an uninterrupted run would have seen.

A reader's position (``_state``): per source ``sources`` ``(epoch, consumed)`` and ``seek``, the
epoch stream's position (:mod:`vlp.data.epoch_stream`: the shard and byte offset it reads next, the
byte spans of the samples in its shuffle buffer, the shuffle generator's state); ``draws`` of the
source mixer; ``batches`` made. A resumed reader seeks: it reads the buffered samples again by
range reads and goes on from the offset, so resuming costs the same early or late in an epoch. Where
``seek`` is None (a position saved by an older vlp, ``pipe:`` and gzip shards, see
:mod:`vlp.data.shard_io`) it replays the epoch from its start instead, reading tar bytes without
decoding.

With ``unique_captions`` a sample whose caption is already in the batch waits for a later batch;
``_state`` then also lists where each waiting sample was read (``pending``: (source, epoch, position
in that reader's epoch stream); ``pending_at``: its byte span), and a resumed run reads exactly those
samples again.
"""

from __future__ import annotations

import itertools
import logging
import signal
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from vlp.data.decode import DecodeOptions, SkipCounter, caption_variant, decode_sample
from vlp.data.epoch_stream import pair_units  # noqa: F401 - pair_units: used from here
from vlp.data.extra_captions import ExtraCaptionSpec, extra_caption_tensors
from vlp.data.readers import Mixer, SourceReader, read_again
from vlp.data.shard_io import shard_samples
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


def _shard_samples(url: str, skips: SkipCounter) -> Iterator[dict]:
    """Samples of one tar shard, damage skipped and counted (:func:`vlp.data.shard_io.shard_samples`)."""
    for sample, _, _ in shard_samples(url, skips):
        yield sample


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
        seek = state.get("seek") or [None] * len(self.spec.sources)  # absent: saved before positions had offsets
        readers_ = [
            SourceReader(urls, self.spec, reader, readers, skips, *state["sources"][i], guard, i, seek[i])
            for i, urls in enumerate(self.spec.sources)
        ]
        mixer = Mixer(readers_, self.spec.weights, self.spec.seed, reader, state["draws"])
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
            pending = self._reread(readers_, state.get("pending", []), state.get("pending_at", []))
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
        """Decode, tag with (source, epoch, position) and its byte span, and draw the caption variant
        of this epoch."""
        sample = decode_sample(raw, self.spec.decode, skips)
        if sample is None:
            return None
        sample["_epoch"], sample["_origin"] = origin[1], tuple(origin)
        at = raw.get("__at__")
        sample["_at"] = None if at is None else [*at, raw.get("_unit")]
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

    def _reread(self, readers: list[SourceReader], origins: list, spans: list) -> list[dict]:
        """The samples read at ``origins`` ((source, epoch, position)), decoded again, in order: by
        range reads of their byte ``spans`` where known, else by reading their epoch again
        (:func:`vlp.data.readers.read_again`). Skips are not counted again: they were counted when
        the samples were first read."""
        quiet = SkipCounter(examples_per_kind=0)
        raws = read_again(readers, [tuple(o) for o in origins], spans, quiet)
        samples = [self._decode(raws[k], tuple(o), quiet) if k in raws else None for k, o in enumerate(origins)]
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
