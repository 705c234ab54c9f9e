"""Local WebDataset shards indexed instead of held: evaluation keeps, per image, where its bytes are
(:class:`TarSlice`: file, offset, size) and reads them when it encodes the image, so an eval set
costs memory for its labels and captions only, however many images it has, during ``vlp eval`` and
for the whole of a training run that evaluates on it.

Only the small members (``cls``, ``txt``, ``json``, ...) are read while indexing; the image
members are skipped by seeking. Remote shards (``http(s)://``, ``pipe:``) cannot be sought: they are
streamed once, a sample at a time, and their image members written to a :class:`Spool` (local files
in a temporary folder, removed with it) as they pass, so memory holds one sample however large the
set; the disk holds the set's images while it is in use.
"""

from __future__ import annotations

import os
import shutil
import tarfile
import tempfile
import weakref
from collections.abc import Iterable, Iterator
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


def _remove_folder(folder: str, owner_pid: int) -> None:
    if os.getpid() == owner_pid:  # never from a forked DataLoader worker's copy
        shutil.rmtree(folder, ignore_errors=True)


class Spool:
    """A temporary folder that remote shards' images are written to as they stream past
    (:meth:`samples`); the folder goes when the Spool is garbage collected or the process exits.
    Hold the Spool as long as its TarSlices are read (``EvalData.spool``). The folder is made under
    ``tempfile.gettempdir()`` (``TMPDIR``)."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="vlp-eval-spool-")
        self.files = 0
        weakref.finalize(self, _remove_folder, self.folder, os.getpid())

    def samples(self, samples: Iterable[dict], image_keys: tuple[str, ...]) -> Iterator[dict]:
        """``samples`` (one shard's, as the shard reader yields them) with each image member written
        to a spool file and replaced by its :class:`TarSlice`; written and flushed before it is yielded."""
        path = os.path.join(self.folder, f"{self.files}.bin")
        self.files += 1
        with open(path, "wb") as f:
            for sample in samples:
                for key in image_keys:
                    data = sample.get(key)
                    if isinstance(data, (bytes, bytearray)):
                        sample[key] = TarSlice(path, f.tell(), len(data))
                        f.write(data)
                f.flush()
                yield sample
