"""Local WebDataset shards indexed instead of held: evaluation keeps, per image, where its bytes are
(:class:`TarSlice`: file, offset, size) and reads them when it encodes the image, so an eval set
costs memory for its labels and captions only, however many images it has, during ``vlp eval`` and
for the whole of a training run that evaluates on it.

Only the small members (``cls``, ``txt``, ``json``, ...) are read while indexing; the image
members are skipped by seeking. Remote shards (``http(s)://``, ``pipe:``) cannot be sought and are
read as before (their image bytes held).
"""

from __future__ import annotations

import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class TarSlice:
    """The bytes of one tar member: ``read()`` opens the file, seeks and reads ``size`` bytes."""

    path: str
    offset: int
    size: int

    def read(self) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(self.offset)
            data = f.read(self.size)
        if len(data) != self.size:
            raise OSError(f"{self.path}: {self.size} bytes expected at offset {self.offset}, {len(data)} read")
        return data


def is_local(url: str) -> bool:
    return "://" not in url and not url.startswith("pipe:") and os.path.isfile(url)


def _split(name: str) -> tuple[str, str]:
    """WebDataset's key / extension of a member name: the extension starts at the first dot of the base name."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), ext.lower() if dot else ""


def indexed_samples(path: str, image_keys: tuple[str, ...], max_small: int = 1 << 20) -> Iterator[dict]:
    """Samples of a local tar as the shard reader gives them (``__key__``, ``__url__`` and one entry
    per member), but with image members as :class:`TarSlice` objects; members larger than
    ``max_small`` that are not images are skipped. Raises tarfile.ReadError / OSError for a damaged file."""
    sample: dict = {}
    with tarfile.open(path, mode="r:") as tar:
        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split(member.name)
            if sample and sample["__key__"] != key:
                yield sample
                sample = {}
            if not sample:
                sample = {"__key__": key, "__url__": path}
            if ext in image_keys:
                sample[ext] = TarSlice(path, member.offset_data, member.size)
            elif member.size <= max_small:
                f = tar.extractfile(member)
                sample[ext] = f.read() if f is not None else b""
    if sample:
        yield sample
