"""One epoch of one source for one reader: shards -> raw samples -> pair units -> shuffle buffer ->
samples, with a position that can be saved after any sample and a stream rebuilt from it by seeking.

The position (:meth:`EpochStream.position`) holds everything the stream has read and not yet handed
out, as byte spans in the epoch's shards, and where it reads next:

- ``at``: ``[shard index, byte offset]`` of the next sample to read (None: every shard is read);
- ``buffer``: the shuffle buffer's entries, in buffer order (each a list of samples: one, or the
  members of a minimal-pair unit);
- ``open``: the samples of the pair unit still being gathered; ``serial``: the next unit's serial;
- ``out``: the rest of the unit being handed out;
- ``rng``: the shuffle generator's state, ``[version, internal state, gauss]``.

A sample is recorded as ``shard index, start, end, unit`` (``unit``: its ``_unit`` stamp); the
samples of ``buffer``, ``open`` and ``out`` and the generator's internal state are packed as int64s
in base64 strings (:func:`pack_items`), which cost nothing to hand between processes.
:meth:`EpochStream.restored` reads those samples again by their spans (one range read per run of
neighbours, :func:`vlp.data.shard_io.read_spans`), restores the generator and goes on reading from
``at``: what it hands out is what the saved stream would have handed out. Where a sample has no
span (a ``pipe:`` shard, a gzip one) there is no position (None), and the reader replays the epoch
from its start instead.

The shuffle is webdataset's ``_shuffle`` (buffer filled to its size two samples per step, then one
in, one out, drawn by ``rng.randint`` and replaced by the last entry), written out here so that its
buffer and generator can be saved and restored: it hands out the same samples in the same order.
"""

from __future__ import annotations

import base64
import json
import logging
import random
import sys
from array import array
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from vlp.data.extra_captions import PAIR_GROUP_LIMIT, pair_id
from vlp.data.shard_io import samples_at, shard_samples

log = logging.getLogger(__name__)


class _NoSpan(Exception):
    """A sample read from a shard that cannot seek: the stream has no position to save."""


def raw_pair_id(sample: dict) -> int:
    """The minimal-pair id of a raw sample (its JSON's ``pair``), -1 when it has none. Metadata that
    is not JSON gives no id here (decoding counts it later)."""
    try:
        meta = json.loads(sample["json"]) if "json" in sample else None
    except ValueError:
        meta = None
    return pair_id({"json": meta})


class PairUnits:
    """Gathers consecutive samples with the same pair id (at most PAIR_GROUP_LIMIT) into units,
    stamping each sample's ``_unit`` with its unit's serial (-1 for a sample with no id)."""

    def __init__(self, serial: int = 0, gathering: list[dict] | None = None):
        self.serial, self.open = serial, list(gathering or [])
        self.open_id = raw_pair_id(self.open[-1]) if self.open else -1

    def push(self, sample: dict) -> list[dict] | None:
        """Add ``sample``; the unit it completes, if any."""
        sid = raw_pair_id(sample)
        done = None
        if self.open and (sid < 0 or sid != self.open_id or len(self.open) == PAIR_GROUP_LIMIT):
            done = self.flush()
        self.open.append(sample)
        self.open_id = sid
        return done

    def flush(self) -> list[dict] | None:
        """The unit being gathered, stamped (None when empty)."""
        if not self.open:
            return None
        unit, self.open = self.open, []
        for s in unit:
            s["_unit"] = self.serial if self.open_id >= 0 else -1
        self.serial += 1
        return unit


def pair_units(raw: Iterator[dict]) -> Iterator[list[dict]]:
    """Raw samples as shuffle units: consecutive samples with the same minimal-pair id (their JSON's
    ``pair``, :func:`vlp.data.extra_captions.pair_id`), at most PAIR_GROUP_LIMIT, make one unit, so
    a shuffle buffer moves a pair or group as a whole and its members stay side by side; any other
    sample is a unit of its own (one more with the same id starts a new unit).

    Each sample gets ``_unit``: the serial of its unit in this stream (0, 1, ...), or -1 for a sample
    with no id. The batch's ``pair_id`` is made from it (:func:`vlp.data.extra_captions.source_pair_id`),
    so a JSON id used again elsewhere in the data (numbering restarted in every shard) never joins
    unrelated samples."""
    units = PairUnits()
    for sample in raw:
        done = units.push(sample)
        if done:
            yield done
    last = units.flush()
    if last:
        yield last


SHARDS_AT_ONCE = 4  # shards whose held samples are read again concurrently
NO_STAMP = -2  # a packed record's unit for a sample with no ``_unit`` (stamps are -1 or a serial)


def _packed(values: array) -> str:
    if sys.byteorder == "big":  # packed little-endian, so a position moves between machines
        values.byteswap()
    return base64.b64encode(values.tobytes()).decode("ascii")


def _unpacked(text: str) -> array:
    values = array("q")
    values.frombytes(base64.b64decode(text))
    if sys.byteorder == "big":
        values.byteswap()
    return values


def pack_items(items: list[list[dict]]) -> str:
    """Samples held by the stream, as one base64 string of int64s: per item its length, then per
    sample ``shard index, start, end, unit`` (NO_STAMP for none). A batch carries its position from
    the worker to the training process, whose pin-memory thread would otherwise walk a list per
    sample (milliseconds per batch for a buffer of 1000). Raises _NoSpan for a sample with no span."""
    flat = array("q")
    for item in items:
        flat.append(len(item))
        for sample in item:
            at, unit = sample.get("__at__"), sample.get("_unit")
            if at is None:
                raise _NoSpan
            flat.extend((at[0], at[1], at[2], NO_STAMP if unit is None else unit))
    return _packed(flat)


def unpack_items(text: str) -> list[list[list]]:
    """:func:`pack_items`'s items, each a list of ``[shard index, start, end, unit or None]``."""
    flat, items, k = _unpacked(text), [], 0
    while k < len(flat):
        n, k = flat[k], k + 1
        records = [flat[j : j + 4].tolist() for j in range(k, k + 4 * n, 4)]
        items.append([[i, start, end, None if unit == NO_STAMP else unit] for i, start, end, unit in records])
        k += 4 * n
    return items


class EpochStream:
    """Raw samples of ``shards`` in order, grouped into pair units (``pairs``), shuffled through a
    buffer of ``bufsize`` entries drawn with ``rng`` (None: no shuffle) and handed out one by one.
    Each raw sample carries ``__at__``: ``(shard index, start, end)``, or None without a span.
    ``on_empty(url)`` hears of a shard read from its start that gave no sample."""

    def __init__(self, shards: list[str], skips, *, pairs: bool = False, bufsize: int = 0,
                 rng: random.Random | None = None, on_empty: Callable[[str], None] | None = None):  # fmt: skip
        self.shards, self.skips, self.on_empty = shards, skips, on_empty
        self.units = PairUnits() if pairs else None
        self.rng = rng if bufsize > 1 else None
        self.bufsize = bufsize
        self.at: list | None = [0, 0]
        self.buffer: list = []
        self.out: list[dict] = []

    def __iter__(self) -> Iterator[dict]:
        while self.out:  # restored while handing out a pair unit
            yield self.out.pop(0)
        items = self._raw()
        if self.units is not None:
            items = self._gathered(items)
        if self.rng is not None:
            items = self._shuffled(items)
        for item in items:
            if self.units is None:
                yield item
                continue
            self.out = list(item)
            while self.out:
                yield self.out.pop(0)

    def _raw(self) -> Iterator[dict]:
        if self.at is None:
            return
        first, offset = self.at
        for i in range(first, len(self.shards)):
            url, n = self.shards[i], 0
            for sample, start, end in shard_samples(url, self.skips, offset):
                n += 1
                sample["__at__"] = None if start is None else (i, start, end)
                self.at = [i, end]
                yield sample
            if n == 0 and offset == 0 and self.on_empty is not None:
                self.on_empty(url)
            self.at, offset = [i + 1, 0], 0
        self.at = None

    def _gathered(self, raw: Iterator[dict]) -> Iterator[list[dict]]:
        for sample in raw:
            done = self.units.push(sample)
            if done:
                yield done
        last = self.units.flush()
        if last:
            yield last

    def _shuffled(self, items: Iterator) -> Iterator:
        buf = self.buffer
        for item in items:
            buf.append(item)
            if len(buf) < self.bufsize:
                more = next(items, None)
                if more is not None:
                    buf.append(more)
            if len(buf) >= self.bufsize:
                yield self._pick()
        while buf:
            yield self._pick()

    def _pick(self):
        buf = self.buffer
        k = self.rng.randint(0, len(buf) - 1)
        item = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        return item

    def position(self) -> dict | None:
        """Where this stream is, as described in the module docstring; None when a sample it holds,
        or the shard it reads, has no byte span."""
        if self.at is not None and self.at[1] is None:
            return None
        rng = None
        if self.rng is not None:
            version, internal, gauss = self.rng.getstate()
            rng = [version, _packed(array("q", internal)), gauss]
        try:
            return {
                "at": None if self.at is None else list(self.at),
                "buffer": pack_items(self.buffer if self.units is not None else [[s] for s in self.buffer]),
                "open": pack_items([self.units.open] if self.units is not None else []),
                "serial": self.units.serial if self.units is not None else 0,
                "out": pack_items([self.out]),
                "rng": rng,
            }
        except _NoSpan:
            return None

    @classmethod
    def restored(cls, shards: list[str], skips, position: dict, **options) -> EpochStream:
        """The stream :meth:`position` described, its held samples read again by their spans."""
        stream = cls(shards, skips, **options)
        at = position["at"]
        stream.at = None if at is None else list(at)
        opened, out = (unpack_items(position[k]) or [[]] for k in ("open", "out"))
        groups = [opened[0], out[0], *unpack_items(position["buffer"])]
        samples = iter(read_records(shards, [r for g in groups for r in g], skips))
        opened, out, *buffer = [[s for s in (next(samples) for _ in g) if s is not None] for g in groups]
        if stream.units is not None:
            stream.units = PairUnits(int(position["serial"]), opened)
            stream.buffer = [unit for unit in buffer if unit]
        else:
            stream.buffer = [item[0] for item in buffer if item]
        stream.out = out
        if stream.rng is not None and position.get("rng") is not None:
            version, internal, gauss = position["rng"]
            stream.rng.setstate((version, tuple(_unpacked(internal)), gauss))
        return stream


def read_records(shards: list[str], records: list, skips) -> list[dict | None]:
    """The raw samples at ``records`` (``[shard index, start, end, unit]``) of ``shards``, read again
    (the shards concurrently, each in as few requests as its spans allow); None (and a
    ``shard_error``) for one that cannot be read again."""
    by_shard: dict[int, list[int]] = {}
    for k, rec in enumerate(records):
        by_shard.setdefault(int(rec[0]), []).append(k)

    def fetch(i: int) -> tuple[list[tuple[int, int]], list[dict | None] | Exception]:
        spans = [(int(records[k][1]), int(records[k][2])) for k in by_shard[i]]
        try:
            return spans, samples_at(shards[i] if i < len(shards) else "?", spans)
        except Exception as exn:  # noqa: BLE001 - a shard that cannot be read is data, not a bug
            return spans, exn

    found: list[dict | None] = [None] * len(records)
    with ThreadPoolExecutor(max(1, min(SHARDS_AT_ONCE, len(by_shard)))) as pool:
        fetched = dict(zip(by_shard, pool.map(fetch, by_shard)))
    for i, (spans, samples) in fetched.items():
        url, ks = shards[i] if i < len(shards) else "?", by_shard[i]
        if isinstance(samples, Exception):
            skips.add("shard_error", url, f"reading {len(ks)} sample(s) again: {samples!r}")
            continue
        lost = samples.count(None)
        if lost:
            skips.add("shard_error", url, f"{lost} sample(s) of the saved position are no longer where they were read")
        for k, span, sample in zip(ks, spans, samples, strict=True):
            if sample is None:
                continue
            sample["__at__"] = (i, *span)
            if records[k][3] is not None:
                sample["_unit"] = records[k][3]
            found[k] = sample
    missing = found.count(None)
    if missing:
        log.warning("%d sample(s) of the saved position could not be read again: have the shards changed?", missing)
    return found
