"""Shard lists: brace/glob expansion, epoch sizes, and which reader reads which shard.

Patterns are brace-expanded; local ones with ``*``, ``?`` or ``[`` are globbed and must exist, and
so are object-storage urls (fsspec: ``s3://bucket/train-*.tar``), listed with their filesystem's glob.
Other urls (``http(s)://``, ``pipe:``) pass unchecked. How each kind is read: :mod:`vlp.data.shard_io`.

A *reader* is one (rank, worker) pair; there are ``world * workers`` readers. Without
resampling every epoch permutes the shard list with the same seed on every rank and reader
``r`` takes shards ``r, r + R, r + 2R, ...`` so each shard is read exactly once per epoch.
With resampling each reader draws shards with replacement from its own seeded generator.
"""

from __future__ import annotations

import glob
import json
import random
from pathlib import Path

from braceexpand import braceexpand

from vlp.data.shard_io import fsspec_check, fsspec_fs, is_url, scheme


class DataConfigError(ValueError):
    """Shard lists that cannot work; raised before any data is read."""


def expand_urls(patterns: list[str] | str, key: str = "data.train_shards") -> list[str]:
    """Brace-expand (and, for local paths, glob) shard patterns; local files must exist."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if scheme(url) == "fsspec":
                urls.extend(_fsspec_urls(url, pattern, key))
                continue
            if is_url(url):
                urls.append(url)
                continue
            matches = sorted(glob.glob(url)) if any(c in url for c in "*?[") else [url]
            missing = [m for m in matches if not Path(m).is_file()]
            if not matches or missing:
                raise DataConfigError(
                    f"{key}: shard file not found: {missing[0] if missing else url} (from pattern "
                    f"'{pattern}'). Write shards with `vlp shards` or fix the path."
                )
            urls.extend(matches)
    if not urls:
        raise DataConfigError(f"{key}: no shards given")
    return urls


def _fsspec_urls(url: str, pattern: str, key: str) -> list[str]:
    """``url`` itself, or the objects its glob matches; the scheme's package must be installed."""
    try:
        fsspec_check(url)
    except (ImportError, ValueError) as e:
        raise DataConfigError(f"{key}: cannot read '{pattern}': {e}") from None
    if not any(c in url.split("://", 1)[1] for c in "*?["):
        return [url]
    fs, path = fsspec_fs(url)
    protocol = url.split("://", 1)[0]
    matches = [f"{protocol}://{m}" for m in sorted(fs.glob(path))]
    if not matches:
        raise DataConfigError(f"{key}: no shard matches {url} (from pattern '{pattern}')")
    return matches


def _sizes_beside(url: str) -> dict:
    """The ``sizes.json`` in the folder of ``url`` (local or fsspec), or {}."""
    if scheme(url) == "fsspec":
        folder = url.rsplit("/", 1)[0]
        try:
            fs, path = fsspec_fs(f"{folder}/sizes.json")
            return json.loads(fs.cat_file(path))
        except Exception:  # noqa: BLE001 - no readable sizes.json: the epoch length is unknown, not an error
            return {}
    f = Path(url).parent / "sizes.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def read_sizes(urls: list[str]) -> int | None:
    """Total samples of ``urls`` from the ``sizes.json`` beside them (local or object storage);
    None if any is unknown."""
    total, cache = 0, {}
    for url in urls:
        if is_url(url) and scheme(url) != "fsspec":
            return None
        folder, name = url.rsplit("/", 1) if "/" in url else (".", url)
        if folder not in cache:
            cache[folder] = _sizes_beside(url)
        n = cache[folder].get(name)
        if n is None:
            return None
        total += int(n)
    return total


def check_readers(urls: list[str], world: int, workers: int, resampled: bool, key: str) -> None:
    """Without resampling each reader needs a shard, else it would have nothing to stream."""
    readers = world * max(workers, 1)
    if not resampled and len(urls) < readers:
        raise DataConfigError(
            f"{key}: {len(urls)} shard(s) cannot feed {world} rank(s) x {max(workers, 1)} worker(s) = "
            f"{readers} readers without resampling. Write more, smaller shards (vlp shards "
            f"--max-samples-per-shard), lower data.workers, or set data.resampled=true."
        )


def reader_shards(
    urls: list[str], *, epoch: int, reader: int, readers: int, seed: int, resampled: bool, shuffle: bool = True
) -> list[str]:
    """The shards reader ``reader`` of ``readers`` streams in ``epoch`` (deterministic)."""
    if resampled:
        rng = random.Random(f"resample/{seed}/{reader}/{epoch}")
        per_reader = max(1, len(urls) // readers)
        return [rng.choice(urls) for _ in range(per_reader)]
    order = list(urls)
    if shuffle:
        random.Random(f"shards/{seed}/{epoch}").shuffle(order)
    return order[reader::readers]
