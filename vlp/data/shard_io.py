"""Reading shards wherever they are, from their start or from a byte offset, and single samples by
their byte span.

Where a url leads, and how a read that starts past byte 0 is made (a resumed run's seek,
:mod:`vlp.data.epoch_stream`):

- a local path or ``file://`` url: a file, ``seek``;
- ``http://`` / ``https://``: from byte 0 through webdataset's ``gopen`` (curl, with its retries);
  from an offset, and single samples, by an HTTP ``Range`` request. A server that ignores ``Range``
  answers with the whole file: its bytes before the offset are read and dropped, so the result is
  the same, only slower;
- any other ``scheme://`` fsspec knows (``s3://``, ``gs://``, ``az://``, ``hf://``... with its package
  installed: s3fs for S3, gcsfs for GCS, as for ``train.output_dir``): an fsspec file read in blocks
  of ``FSSPEC_BLOCK`` bytes by range requests (streamed, never downloaded whole), ``seek``; single
  samples by ``cat_ranges``;
- ``pipe:`` commands, and schemes only webdataset's ``gopen`` knows (``ais://``, ``scp://``...):
  through ``gopen``, from byte 0 only. A position in such a shard is found again by reading the epoch
  from its start (see the stream's module docstring).

A shard that cannot be opened or read is counted as ``shard_error`` by the caller; nothing here
retries past what the transport itself does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import BinaryIO
from urllib.parse import urlparse
from urllib.request import url2pathname

from vlp.data.tar_reader import located_samples

FSSPEC_BLOCK = 8 << 20  # bytes per range request while streaming an object
MERGE_GAP = 256 << 10  # samples read again whose spans are at most this far apart are fetched in one request
HTTP_PARALLEL = 4  # http(s) range requests in flight per shard when reading samples again
HTTP_TIMEOUT = 60  # seconds without a byte before an http(s) range read fails


@functools.cache
def _fsspec_protocols() -> frozenset[str]:
    import fsspec

    return frozenset(fsspec.available_protocols())


def is_url(url: str) -> bool:
    """Whether ``url`` is a URL (``scheme://...``) or a ``pipe:`` command rather than a local path."""
    return "://" in url or url.startswith("pipe:")


def scheme(url: str) -> str:
    """``local``, ``http``, ``fsspec`` or ``gopen``: how :func:`open_shard` reads ``url``."""
    if url.startswith("pipe:"):
        return "gopen"
    if "://" not in url:
        return "local"
    proto = urlparse(url).scheme.lower()
    if proto == "file":
        return "local"
    if proto in ("http", "https"):
        return "http"
    return "fsspec" if proto in _fsspec_protocols() else "gopen"


def seekable(url: str) -> bool:
    """Whether a read of ``url`` can start at any byte (``pipe:`` and gopen's own schemes cannot)."""
    return scheme(url) != "gopen"


def _local_path(url: str) -> str:
    return url2pathname(urlparse(url).path) if url.startswith("file://") else url


def fsspec_fs(url: str):
    """``(filesystem, path)``; a fresh lookup each time: fsspec's instances are per process, and a
    DataLoader worker is a forked process."""
    from fsspec.core import url_to_fs

    return url_to_fs(url)


def fsspec_check(url: str) -> None:
    """Raise ImportError (naming the package to install) or ValueError (an unknown scheme) when
    fsspec cannot read ``url``'s scheme in this environment."""
    from fsspec.registry import get_filesystem_class

    get_filesystem_class(urlparse(url).scheme.lower())


def open_shard(url: str, offset: int = 0) -> BinaryIO:
    """A binary stream of the shard ``url`` from byte ``offset``. Raises ValueError for an offset in
    a shard that cannot seek (:func:`seekable`), OSError and others when the shard cannot be opened."""
    kind = scheme(url)
    if kind == "local":
        f = open(_local_path(url), "rb")  # noqa: SIM115 - the caller closes it
        if offset:
            f.seek(offset)
        return f
    if kind == "fsspec":
        fs, path = fsspec_fs(url)
        f = fs.open(path, "rb", block_size=FSSPEC_BLOCK)
        if offset:
            f.seek(offset)
        return f
    if offset and kind == "http":
        return _http_from(url, offset)
    if offset:
        raise ValueError(f"{url}: a read from byte {offset} needs a seekable url (a file, http(s), fsspec)")
    from webdataset.gopen import gopen

    return gopen(url)


def _http_from(url: str, start: int, end: int | None = None) -> BinaryIO:
    """The body of ``url`` from byte ``start`` (to ``end``, exclusive, when given)."""
    wanted = f"bytes={start}-{'' if end is None else end - 1}"
    try:
        resp = urllib.request.urlopen(urllib.request.Request(url, headers={"Range": wanted}), timeout=HTTP_TIMEOUT)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing at or after ``start``: the shard ended there
            return io.BytesIO(b"")
        raise
    if resp.status == 206 and resp.headers.get("Content-Range", "").startswith(f"bytes {start}-"):
        return resp
    # the server ignored the range and sends the whole file: drop what comes before ``start``
    left = start
    while left:
        chunk = resp.read(min(left, 1 << 20))
        if not chunk:
            break
        left -= len(chunk)
    return resp


def read_spans(url: str, spans: list[tuple[int, int]]) -> list[bytes]:
    """The bytes ``[start, end)`` of ``url`` for each span, in the order given. Spans closer than
    ``MERGE_GAP`` are fetched together (one request for a run of neighbouring samples); the merged
    spans are fetched concurrently (fsspec's ``cat_ranges``, HTTP_PARALLEL http requests). Raises
    what the transport raises."""
    if not spans:
        return []
    order = sorted(range(len(spans)), key=lambda k: spans[k])
    merged: list[list[int]] = []
    for k in order:
        start, end = spans[k]
        if merged and start - merged[-1][1] <= MERGE_GAP:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    blobs = _fetch(url, merged)
    out: list[bytes] = [b""] * len(spans)
    m = 0
    for k in order:
        start, end = spans[k]
        while not merged[m][0] <= start < merged[m][1] or end > merged[m][1]:
            m += 1
        out[k] = blobs[m][start - merged[m][0] : end - merged[m][0]]
    return out


def _fetch(url: str, spans: list[list[int]]) -> list[bytes]:
    kind = scheme(url)
    if kind == "fsspec":
        fs, path = fsspec_fs(url)
        blobs = fs.cat_ranges([path] * len(spans), [s for s, _ in spans], [e for _, e in spans], on_error="raise")
        return list(blobs)
    if kind == "local":
        out = []
        with open(_local_path(url), "rb") as f:
            for start, end in spans:
                f.seek(start)
                out.append(f.read(end - start))
        return out
    if kind == "http":

        def get(span: list[int]) -> bytes:
            with contextlib.closing(_http_from(url, span[0], span[1])) as resp:
                return resp.read(span[1] - span[0])

        with ThreadPoolExecutor(min(HTTP_PARALLEL, len(spans))) as pool:
            return list(pool.map(get, spans))
    raise ValueError(f"{url}: single samples can only be read again from a seekable url")


def samples_at(url: str, spans: list[tuple[int, int]]) -> list[dict | None]:
    """The samples whose byte spans in the plain tar ``url`` are ``spans`` (from
    :func:`vlp.data.tar_reader.located_samples`), read again; None for a span that no longer holds
    one whole sample. Raises what the transport raises."""
    out: list[dict | None] = []
    for (start, _), data in zip(spans, read_spans(url, spans), strict=True):
        found = list(located_samples(io.BytesIO(data), url, lambda *_: None, base=start))
        out.append(found[0][0] if len(found) == 1 else None)
    return out


def truncated(url: str) -> bool:
    """A complete tar ends in zero blocks and has a size that is a multiple of 512 bytes.

    Python's tarfile treats a file cut at a header boundary as a shorter valid archive, so a
    truncated local shard is detected here; for remote urls only read errors are seen. A gzip
    file (``.tar.gz``, ``.tgz``, recognised by its magic bytes) is not checked here: its own
    trailer (length and CRC) makes a cut stream fail while it is read, and the tar reader counts that.
    """
    if scheme(url) != "local":
        return False
    path = _local_path(url)
    if not os.path.isfile(path):
        return False
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        if f.read(2) == b"\x1f\x8b":
            return False
        if size < 1024 or size % 512:
            return True
        f.seek(size - 1024)
        return f.read(1024).count(0) != 1024


def shard_samples(url: str, skips, offset: int = 0) -> Iterator[tuple[dict, int | None, int | None]]:
    """``(sample, start, end)`` of one tar shard from byte ``offset`` (a member's header, or the end
    of the archive); the span is None where the shard cannot seek (``pipe:``, gzip). Damage is counted
    in ``skips`` once per damaged region (``shard_error``) and reading resumes at the next intact
    member (:mod:`vlp.data.tar_reader`), so only the damaged samples are lost; a shard that cannot be
    opened is counted once. A read from an offset goes on where an earlier one stopped: a truncated
    local shard was counted then, and is not counted again."""
    cut = truncated(url)
    if cut and offset == 0:
        skips.add("shard_error", url, "truncated: no end-of-archive marker")

    def on_damage(at: int, why: str) -> None:
        if not (cut and why.startswith("truncated")):
            skips.add("shard_error", url, f"{why} (byte {at})" if at >= 0 else why)

    try:
        stream = open_shard(url, offset)
    except Exception as exn:  # noqa: BLE001 - any failure of a shard is data, not a bug
        skips.add("shard_error", url, repr(exn))
        return
    finished, spans = False, seekable(url)
    try:
        for sample, start, end in located_samples(stream, url, on_damage, base=offset):
            yield (sample, start, end) if spans else (sample, None, None)
        finished = True
    except _read_errors() as exn:  # a read error of the file, object or pipe
        skips.add("shard_error", url, repr(exn))
    finally:
        if finished:
            stream.close()
        else:
            abandon(stream)


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a failed read raises: OSError for files, pipes, urllib and most of fsspec; and the
    transports' own errors, where their packages are in use (an S3 read that cannot connect raises
    botocore's errors, a cut response aiohttp's)."""
    errors: list[type[BaseException]] = [OSError, EOFError, ValueError]
    if "botocore.exceptions" in sys.modules:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    if "aiohttp" in sys.modules:
        from aiohttp import ClientError as AiohttpError

        errors.append(AiohttpError)
    return tuple(errors)


def abandon(stream) -> None:
    """Close a shard left before its end (a stop signal, an error, a closed loader) without waiting:
    a ``pipe:`` command still running (a download, a stalled read) is killed, not awaited (webdataset's
    close would wait for it, for hours if it hangs)."""
    proc = getattr(stream, "proc", None)
    if proc is not None and proc.poll() is None:
        proc.kill()
    with contextlib.suppress(Exception):  # the killed command's exit status, or a stream already broken
        stream.close()
