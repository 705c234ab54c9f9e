"""Tar members from a byte stream, resynchronising after damage instead of giving up the shard.

Python's ``tarfile`` (and so webdataset's reader) stops at the first damaged header: every sample
after it is lost. This reader checks each 512-byte header's checksum; after a bad one it scans
forward, block by block, to the next header whose checksum is valid and goes on from there. Only
the members whose headers or data were damaged are lost, and each damaged region is reported once
through ``on_damage(offset, why)`` (a sample that lost some of its files is then reported by the
decoder as missing its image or caption).

Each member and sample comes with the byte span it was read from (``start``: its first header, a
GNU or PAX name record included; ``end``: past its padded data), so that a sample can be read again
on its own, and a shard read on from the sample after it (:mod:`vlp.data.epoch_stream`). The spans
of a gzip-compressed shard are None: its offsets are in the decompressed stream, where no read can
seek.

Nothing is ever written to disk: member names are data (``../x`` or ``/abs/x`` are only keys).
Handles ustar / GNU / POSIX (PAX) archives: long names from ``L`` and ``x`` records, base-256
sizes; gzip-compressed shards are decompressed on the fly. Links, directories and devices are
skipped.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from typing import BinaryIO, NamedTuple

BLOCK = 512


class Member(NamedTuple):
    """A regular file of the archive: its name, its bytes and the byte span ``[start, end)`` it took."""

    name: str
    data: bytes
    start: int
    end: int


def _checksum_ok(header: bytes) -> bool:
    field = header[148:156]
    try:
        stored = int(field.replace(b"\0", b" ").strip() or b"-1", 8)
    except ValueError:
        return False
    unsigned = sum(header[:148]) + 8 * 32 + sum(header[156:])
    signed = unsigned - 2 * sum(b for b in header[:148] + header[156:] if b > 127)  # old tars summed signed bytes
    return stored in (unsigned, signed)


def _number(field: bytes) -> int:
    if field and field[0] & 0x80:  # GNU base-256 for large values
        value = field[0] & 0x7F
        for b in field[1:]:
            value = (value << 8) | b
        return value
    text = field.replace(b"\0", b" ").strip()
    return int(text, 8) if text else 0


def _cstr(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a PAX extended header ("<len> path=<value>\\n" records)."""
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            return None
        try:
            length = int(data[pos:space])
        except ValueError:
            return None
        if length <= 0:
            return None
        record = data[space + 1 : pos + length - 1]
        key, _, value = record.partition(b"=")
        if key == b"path":
            return value.decode("utf-8", "surrogateescape")
        pos += length
    return None


class _Blocks:
    """512-byte blocks of a stream, counting the offset."""

    def __init__(self, f: BinaryIO):
        self.f, self.offset = f, 0

    def read(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.f.read(n - len(data))
            if not chunk:
                break
            data += chunk
        self.offset += len(data)
        return data


class _Prefixed:
    """A stream with ``head`` (already read from it) put back in front."""

    def __init__(self, head: bytes, f: BinaryIO):
        self.head, self.f = head, f

    def read(self, n: int = -1) -> bytes:
        if not self.head:
            return self.f.read(n)
        out, self.head = self.head[:n] if n >= 0 else self.head, self.head[n:] if n >= 0 else b""
        return out


def _open(f: BinaryIO, detect_gzip: bool = True):
    if not detect_gzip:
        return f
    head = f.read(2)
    stream = _Prefixed(head, f)
    return gzip.GzipFile(fileobj=stream) if head == b"\x1f\x8b" else stream


def tar_members(f: BinaryIO, on_damage: Callable[[int, str], None], detect_gzip: bool = True) -> Iterator[Member]:
    """Every regular file of the tar stream ``f``, damage skipped and reported; offsets count from the
    first byte of ``f`` (of the decompressed stream for gzip). ``detect_gzip=False``: ``f`` is known
    to be a plain tar (read from the middle of one, where the first bytes are no magic number)."""
    blocks = _Blocks(_open(f, detect_gzip))
    long_name: str | None = None
    named_at: int | None = None  # where the name record of the next member began
    resyncing = False
    while True:
        start = blocks.offset
        try:
            header = blocks.read(BLOCK)
        except (OSError, EOFError) as e:  # a gzip stream cut short or corrupt
            on_damage(start, f"unreadable stream: {e}")
            return
        if len(header) < BLOCK:
            if header.strip(b"\0") or resyncing:
                on_damage(start, "truncated: the archive ends inside a header")
            return
        if not header.strip(b"\0"):
            continue  # end-of-archive blocks (or zero padding): keep looking until the stream ends
        if not _checksum_ok(header):
            if not resyncing:
                on_damage(start, "damaged header (bad checksum): scanning for the next member")
                resyncing = True
            long_name = named_at = None
            continue
        resyncing = False
        size, kind = _number(header[124:136]), header[156:157]
        name = _cstr(header[0:100])
        if header[257:262] == b"ustar" and header[345:500].strip(b"\0"):
            name = _cstr(header[345:500]) + "/" + name
        padded = (size + BLOCK - 1) // BLOCK * BLOCK
        try:
            data = blocks.read(padded)[:size]
        except (OSError, EOFError) as e:
            on_damage(start, f"unreadable stream: {e}")
            return
        if len(data) < size:
            on_damage(start, f"truncated: member {name!r} has {len(data)} of {size} bytes")
            return
        if kind in (b"L", b"x") and named_at is None:
            named_at = start
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):  # regular files
            yield Member(long_name or name, data, start if named_at is None else named_at, blocks.offset)
            long_name = named_at = None
        else:  # directories, links, devices, global PAX headers: nothing to read
            long_name = named_at = None


def _key_ext(name: str) -> tuple[str, str] | None:
    """WebDataset's split: the key is the path up to the first dot of the file name."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    if dot <= slash:
        return None
    return name[:dot], name[dot + 1 :].lower()


def tar_samples(f: BinaryIO, url: str, on_damage: Callable[[int, str], None]) -> Iterator[dict]:
    """WebDataset samples (``{"__key__", "__url__", ext: bytes, ...}``) from consecutive members with
    the same key. Names like ``__meta__`` are skipped. A repeated extension within one key starts a
    new sample and is reported (a malformed shard), instead of ending the shard."""
    for sample, _, _ in located_samples(f, url, on_damage):
        yield sample


def located_samples(
    f: BinaryIO, url: str, on_damage: Callable[[int, str], None], base: int = 0
) -> Iterator[tuple[dict, int | None, int | None]]:
    """:func:`tar_samples` with the byte span of each sample in the shard: ``(sample, start, end)``,
    from its first member's first header to the end of its last member's data. ``f`` starts at byte
    ``base`` of the shard (a member's header there, or the end of the archive); damage offsets are
    reported from the shard's start too. The spans of a gzip-compressed shard are None."""
    stream = _open(f, detect_gzip=base == 0)  # from the middle of a shard: no magic number to look for
    plain = not isinstance(stream, gzip.GzipFile)
    shift = base if plain else 0

    def damage(offset: int, why: str) -> None:
        on_damage(offset + shift if offset >= 0 else offset, why)

    def done(sample: dict, start: int, end: int) -> tuple[dict, int | None, int | None]:
        return (sample, start + shift, end + shift) if plain else (sample, None, None)

    sample: dict | None = None
    start = end = 0
    for member in tar_members(stream, damage, detect_gzip=False):
        name = member.name
        base_name = name.rsplit("/", 1)[-1]
        if base_name.startswith("__") and base_name.endswith("__"):
            continue
        split = _key_ext(name)
        if split is None:
            continue
        key, ext = split
        if sample is not None and (sample["__key__"] != key or ext in sample):
            if ext in sample and sample["__key__"] == key:
                damage(-1, f"member {name!r} repeats extension {ext!r} of sample {key!r}")
            yield done(sample, start, end)
            sample = None
        if sample is None:
            sample, start = {"__key__": key, "__url__": url}, member.start
        sample[ext], end = member.data, member.end
    if sample is not None:
        yield done(sample, start, end)
