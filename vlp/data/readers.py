"""A reader's raw samples: one :class:`SourceReader` per source, epoch after epoch, from a saved
position, and the :class:`Mixer` that draws which source gives the next sample.

A source's position is ``(epoch, consumed)`` (samples handed out in that epoch) and, where every
sample it holds has a byte span, the epoch stream's position (:mod:`vlp.data.epoch_stream`). A
resumed reader seeks with the latter; without it (a position saved before spans were recorded, a
``pipe:`` or gzip shard) it reads the epoch again from its start and passes over ``consumed``
samples (tar bytes only, no decoding).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Iterator

from vlp.data.epoch_stream import EpochStream, read_records
from vlp.data.shardlists import reader_shards


class SourceReader:
    """Raw samples of one source for one reader, epoch after epoch, from a saved position.

    ``guard`` (:class:`vlp.data.usable.UsableGuard`, training streams) hears of shards that give no
    sample and of finished epochs, as source ``source``; ``seek`` is the epoch stream's saved position."""

    def __init__(self, urls, spec, reader: int, readers: int, skips, epoch=0, consumed=0, guard=None, source=0,
                 seek=None):  # fmt: skip
        self.urls, self.spec, self.reader, self.readers, self.skips = urls, spec, reader, readers, skips
        self.epoch, self.consumed, self.seek = int(epoch), int(consumed), seek
        self.guard, self.source = guard, source
        self.stream: EpochStream | None = None

    def shards(self, epoch: int) -> list[str]:
        spec = self.spec
        return reader_shards(
            self.urls,
            epoch=epoch,
            reader=self.reader,
            readers=self.readers,
            seed=spec.seed,
            resampled=spec.resampled,
            shuffle=spec.infinite,
        )

    def epoch_stream(self, epoch: int, skips=None, position: dict | None = None) -> EpochStream:
        """Epoch ``epoch`` of this source, from its start or from ``position``."""
        spec = self.spec
        shuffled = spec.shuffle_buffer > 1 and spec.infinite
        options = {
            "pairs": spec.extras.pairs,
            "bufsize": spec.shuffle_buffer if shuffled else 0,
            "rng": random.Random(f"samples/{spec.seed}/{self.reader}/{epoch}") if shuffled else None,
            "on_empty": self.guard.empty_shard if self.guard is not None and skips is None else None,
        }
        shards, skips = self.shards(epoch), skips or self.skips
        if position is not None:
            return EpochStream.restored(shards, skips, position, **options)
        return EpochStream(shards, skips, **options)

    def position(self) -> dict | None:
        """The epoch stream's position now (None: replay ``consumed`` samples instead)."""
        return self.stream.position() if self.stream is not None else self.seek

    def __iter__(self) -> Iterator[dict]:
        epoch, skip, seek = self.epoch, self.consumed, self.seek
        while True:
            stream = self.stream = self.epoch_stream(epoch, position=seek if skip else None)
            samples = iter(stream)
            if seek is None or not skip:
                for _ in itertools.islice(samples, skip):
                    pass  # replaying to the resume position: tar bytes only, no decode
            count = skip
            for raw in samples:
                count += 1
                self.epoch, self.consumed = epoch, count
                yield raw
            if not self.spec.infinite:
                return
            # every sample of the epoch has been taken (and decoded) before the next one is asked for
            if self.guard is not None:
                self.guard.epoch_done(self.source, stream.shards, full=skip == 0)
            epoch, skip, seek = epoch + 1, 0, None
            self.epoch, self.consumed = epoch, 0


class Mixer:
    """Draw each sample's source by weight from a seeded generator; replayable by draw count."""

    def __init__(self, sources: list[SourceReader], weights: list[float], seed: int, reader: int, draws=0):
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
        return {
            "sources": [(s.epoch, s.consumed) for s in self.sources],
            "seek": [s.position() for s in self.sources],
            "draws": self.draws,
        }


def read_again(readers: list[SourceReader], origins: list, spans: list, quiet) -> dict[int, dict]:
    """The raw samples handed out at ``origins`` ((source, epoch, position in that epoch's stream)),
    by index into ``origins``: by their byte span where ``spans`` (one per origin, or empty) has one
    (``[shard index, start, end, unit]``), else by reading the epoch again up to the last position
    wanted (tar bytes only). Skips go to ``quiet``: they were counted when the samples were first read."""
    found: dict[int, dict] = {}
    by_epoch: dict[tuple[int, int], list[int]] = {}
    replay: dict[tuple[int, int], dict[int, list[int]]] = {}
    for k, (src, epoch, pos) in enumerate(origins):
        if k < len(spans) and spans[k] is not None:
            by_epoch.setdefault((src, epoch), []).append(k)
        else:
            replay.setdefault((src, epoch), {}).setdefault(pos, []).append(k)
    for (src, epoch), ks in by_epoch.items():
        shards = readers[src].shards(epoch)
        for k, raw in zip(ks, read_records(shards, [spans[k] for k in ks], quiet), strict=True):
            if raw is not None:
                found[k] = raw
    for (src, epoch), wanted in replay.items():
        stream = readers[src].epoch_stream(epoch, skips=quiet)
        for pos, raw in enumerate(itertools.islice(stream, max(wanted) + 1)):
            for k in wanted.get(pos, []):
                found[k] = raw
    return found
