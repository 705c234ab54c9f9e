"""Tar members from a byte stream, resynchronising after damage instead of giving up the shard.

Python's ``tarfile`` (and so webdataset's reader) stops at the first damaged header: every sample
after it is lost. This reader checks each 512-byte header's checksum; after a bad one it scans
forward, block by block, to the next header whose checksum is valid and goes on from there. Only
the members whose headers or data were damaged are lost, and each damaged region is reported once
through ``on_damage(offset, why)`` (a sample that lost some of its files is then reported by the
decoder as missing its image or caption).

Nothing is ever written to disk: member names are data (``../x`` or ``/abs/x`` are only keys).
Handles ustar / GNU / POSIX (PAX) archives: long names from ``L`` and ``x`` records, base-256
sizes; gzip-compressed shards are decompressed on the fly. Links, directories and devices are
skipped.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable, Iterator
from typing import BinaryIO

BLOCK = 512


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


def _open(f: BinaryIO):
    head = f.read(2)
    stream = _Prefixed(head, f)
    return gzip.GzipFile(fileobj=stream) if head == b"\x1f\x8b" else stream


def tar_members(f: BinaryIO, on_damage: Callable[[int, str], None]) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file of the tar stream ``f``, damage skipped and reported."""
    blocks = _Blocks(_open(f))
    long_name: str | None = None
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
            long_name = None
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
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0").decode("utf-8", "surrogateescape")
        elif kind == b"x":  # PAX header of the next member
            long_name = _pax_path(data) or long_name
        elif kind in (b"0", b"\0", b"7"):  # regular files
            yield (long_name or name), data
            long_name = None
        else:  # directories, links, devices, global PAX headers: nothing to read
            long_name = None


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
    sample: dict | None = None
    for name, data in tar_members(f, on_damage):
        base = name.rsplit("/", 1)[-1]
        if base.startswith("__") and base.endswith("__"):
            continue
        split = _key_ext(name)
        if split is None:
            continue
        key, ext = split
        if sample is not None and (sample["__key__"] != key or ext in sample):
            if ext in sample and sample["__key__"] == key:
                on_damage(-1, f"member {name!r} repeats extension {ext!r} of sample {key!r}")
            yield sample
            sample = None
        if sample is None:
            sample = {"__key__": key, "__url__": url}
        sample[ext] = data
    if sample is not None:
        yield sample
