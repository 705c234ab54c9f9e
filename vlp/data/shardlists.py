"""Shard lists: brace/glob expansion, epoch sizes, and which reader reads which shard.

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


class DataConfigError(ValueError):
    """Shard lists that cannot work; raised before any data is read."""


def _is_remote(url: str) -> bool:
    return "://" in url or url.startswith("pipe:")


def expand_urls(patterns: list[str] | str, key: str = "data.train_shards") -> list[str]:
    """Brace-expand (and, for local paths, glob) shard patterns; local files must exist."""
    if isinstance(patterns, str):
        patterns = [patterns]
    urls: list[str] = []
    for pattern in patterns:
        for url in braceexpand(pattern):
            if _is_remote(url):
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


def read_sizes(urls: list[str]) -> int | None:
    """Total samples of ``urls`` from the ``sizes.json`` beside them; None if any is unknown."""
    total, cache = 0, {}
    for url in urls:
        if _is_remote(url):
            return None
        folder = Path(url).parent
        if folder not in cache:
            f = folder / "sizes.json"
            cache[folder] = json.loads(f.read_text()) if f.is_file() else {}
        n = cache[folder].get(Path(url).name)
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
