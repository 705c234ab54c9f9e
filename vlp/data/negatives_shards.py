"""`vlp negatives`: copy shards, adding hard-negative captions to every sample's ``json``.

Each input shard becomes a shard of the same name in the output folder. Every member of every
sample is copied byte for byte, except ``json``, which gains ``field`` (default
``hard_negatives``): a list of up to k ``{"text", "type"}`` objects for the sample's ``txt``
caption (a sample without ``json`` gets one). The other entries of a ``caption_variants``
list count as captions of the image: no negative equals one.

Bad data is passed through unchanged and counted by kind (as :mod:`vlp.data.decode` names it):
a missing, empty or non-UTF-8 caption, a ``json`` that is not a JSON object; of a truncated or
unreadable shard the samples before the damage are written (``shard_error``).

Resumable per shard: each shard is written under a temporary name and renamed when complete,
and ``_negatives.json`` records, after every shard, the parameters and each finished shard's
input size and mtime and output size; a rerun with the same parameters skips the shards whose
record still matches. ``sizes.json`` lists the samples written per shard.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from vlp.data.decode import SkipCounter, caption_variants, decode_caption
from vlp.data.negatives import NegativeGenerator, check_types
from vlp.data.shards import FIXED_MTIME, SIZES_FILE, ShardError, atomic_write_json

logger = logging.getLogger(__name__)

SUMMARY_FILE = "_negatives.json"
# Bump when the negatives written for the same parameters change, so old outputs are rewritten.
NEGATIVES_VERSION = 1
SKIP_KINDS = ("shard_error", "missing_caption", "empty_caption", "bad_caption_encoding", "bad_json")
CHUNK = 256  # samples whose negatives are made together (one LM batch loop)


@dataclass(frozen=True)
class NegativesJob:
    """What to add: k negatives of ``types`` from the ``generator`` ("rules" or "lm")."""

    types: tuple[str, ...]
    k: int = 4
    seed: int = 0
    field: str = "hard_negatives"
    generator: str = "rules"
    lm_model: str = ""
    text_key: str = "txt"
    variants_key: str = "caption_variants"

    def params(self) -> dict:
        return {**asdict(self), "types": list(self.types), "version": NEGATIVES_VERSION}


def sample_seed(seed: int, shard: str, key: str) -> int:
    """A sample's seed: a hash of (seed, shard name, sample key), the same in every process."""
    digest = hashlib.sha256(f"{seed}\0{shard}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little")


def _make_generator(job: NegativesJob, lm_device: str, lm_batch_size: int):
    if job.generator == "rules":
        return NegativeGenerator(job.types)
    if job.generator != "lm":
        raise ShardError(f"unknown generator {job.generator!r}; choose rules or lm")
    if not job.lm_model:
        raise ShardError("the lm generator needs a local model folder (--lm-model DIR)")
    from vlp.data.negatives_lm import LMNegativeGenerator

    return LMNegativeGenerator(job.lm_model, job.types, device=lm_device, batch_size=lm_batch_size, seed=job.seed)


def _prepare(raw: dict, job: NegativesJob, skips: SkipCounter) -> tuple[str, dict, list[str]] | None:
    """(caption, metadata, other positives) of a sample, or None (counted) when it is bad."""
    where = f"{raw.get('__url__', '?')}#{raw.get('__key__', '?')}"
    caption, problem = decode_caption(raw.get(job.text_key))
    if problem:
        skips.add(problem, where)
        return None
    meta: dict = {}
    if "json" in raw:
        try:
            meta = json.loads(raw["json"])
        except ValueError:  # UnicodeDecodeError included
            meta = None
        if not isinstance(meta, dict):
            skips.add("bad_json", where, "not a JSON object")
            return None
    return caption, meta, [v for v in caption_variants(meta, job.variants_key) if v != caption]


def _negatives(generator, job: NegativesJob, shard: str, items: list[tuple[str, str, list[str]]]) -> list[list]:
    """Negatives of (key, caption, positives) items: per sample seeds for rules, per chunk for an LM."""
    if job.generator == "rules":
        return [generator(caption, job.k, sample_seed(job.seed, shard, key), pos) for key, caption, pos in items]
    captions, positives = [c for _, c, _ in items], [p for _, _, p in items]
    return generator.generate(captions, job.k, positives, seed=sample_seed(job.seed, shard, items[0][0]))


def _chunks(samples: Iterator[dict], size: int) -> Iterator[list[dict]]:
    chunk = []
    for sample in samples:
        chunk.append(sample)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _with_negatives(chunk: list[dict], generator, job: NegativesJob, shard: str, skips, stats: Counter) -> None:
    """Replace the json of each good sample of ``chunk`` with one holding its negatives."""
    prepared = [(raw, _prepare(raw, job, skips)) for raw in chunk]
    good = [(raw, p) for raw, p in prepared if p is not None]
    if not good:
        return
    made = _negatives(generator, job, shard, [(raw["__key__"], p[0], p[2]) for raw, p in good])
    for (raw, (_, meta, _)), negatives in zip(good, made):
        meta[job.field] = [{"text": text, "type": kind} for text, kind in negatives]
        raw["json"] = json.dumps(meta, ensure_ascii=False).encode("utf-8")
        stats.update(f"type/{kind}" for _, kind in negatives)
        stats["without_negatives"] += not negatives


def _rewrite_shard(url: str, out_path: Path, generator, job: NegativesJob, skips: SkipCounter, bar) -> dict:
    """Write ``out_path`` from shard ``url``; returns its record (counts, sizes)."""
    import webdataset as wds

    from vlp.data.stream import _shard_samples

    before = Counter(skips.counts)
    stats: Counter = Counter()
    tmp = out_path.with_name(f".{out_path.name}.tmp")
    try:
        with wds.TarWriter(str(tmp), encoder=False, mtime=FIXED_MTIME) as writer:
            for chunk in _chunks(_shard_samples(url, skips), CHUNK):
                _with_negatives(chunk, generator, job, out_path.name, skips, stats)
                for raw in chunk:
                    writer.write({k: v for k, v in raw.items() if k == "__key__" or not k.startswith("__")})
                stats["samples"] += len(chunk)
                bar.update(len(chunk))
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, out_path)
    st = Path(url).stat()
    return {
        "input_size": st.st_size,
        "input_mtime_ns": st.st_mtime_ns,
        "output_size": out_path.stat().st_size,
        "samples": stats["samples"],
        "negatives": sum(v for k, v in stats.items() if k.startswith("type/")),
        "without_negatives": stats["without_negatives"],
        "types": {k[5:]: v for k, v in sorted(stats.items()) if k.startswith("type/")},
        "skipped": {kind: skips.counts[kind] - before[kind] for kind in SKIP_KINDS},
    }


def _up_to_date(record: dict | None, url: str, out_path: Path) -> bool:
    if not record or not out_path.is_file():
        return False
    st = Path(url).stat()
    return (
        record.get("input_size") == st.st_size
        and record.get("input_mtime_ns") == st.st_mtime_ns
        and record.get("output_size") == out_path.stat().st_size
    )


def _read_records(out: Path, params: dict) -> dict:
    """Per-shard records of an earlier run with the same parameters, else {}."""
    try:
        summary = json.loads((out / SUMMARY_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(summary, dict) or summary.get("params") != params:
        return {}
    return dict(summary.get("shards") or {})


def _check_inputs(urls: list[str], out: Path) -> None:
    names = [Path(u).name for u in urls]
    if any("://" in u or u.startswith("pipe:") for u in urls):
        raise ShardError("vlp negatives reads local shards only")
    if len(set(names)) != len(names):
        raise ShardError("two input shards have the same file name; the outputs would overwrite each other")
    if any(Path(u).resolve().parent == out.resolve() for u in urls):
        raise ShardError(f"--out {out} is the input folder; write the shards with negatives elsewhere")


def _summary(params: dict, urls: list[str], records: dict, written: list[str], elapsed: float, pattern) -> dict:
    recs = [records[Path(u).name] for u in urls]
    types: Counter = Counter()
    for r in recs:
        types.update(r["types"])
    return {
        "params": params,
        "num_shards": len(recs),
        "num_samples": sum(r["samples"] for r in recs),
        "negatives": sum(r["negatives"] for r in recs),
        "without_negatives": sum(r["without_negatives"] for r in recs),
        "types": dict(sorted(types.items())),
        "skipped": {kind: sum(r["skipped"].get(kind, 0) for r in recs) for kind in SKIP_KINDS},
        "written": written,
        "up_to_date": [Path(u).name for u in urls if Path(u).name not in written],
        "shards": records,
        "train_shards": pattern,
        "elapsed_s": round(elapsed, 1),
        "complete": True,
    }


def write_negative_shards(
    shards: str | list[str],
    out_dir: str | os.PathLike,
    *,
    types: list[str] | tuple[str, ...],
    k: int = 4,
    seed: int = 0,
    field: str = "hard_negatives",
    generator: str = "rules",
    lm_model: str | os.PathLike | None = None,
    lm_device: str = "cpu",
    lm_batch_size: int = 16,
    progress: bool = True,
) -> dict:
    """Copy the shards of ``shards`` (brace/glob patterns of local tars) into ``out_dir`` with
    up to ``k`` hard negatives of ``types`` in every good sample's json (see the module doc).

    Returns:
        The summary also written to ``out_dir/_negatives.json``: params, num_shards,
        num_samples, negatives, without_negatives, types ({type: count}), skipped ({kind:
        count}), written and up_to_date (shard names), shards (per-shard records),
        train_shards (the pattern to train on), elapsed_s, complete.

    Raises:
        DataConfigError: a shard is missing. ShardError: remote urls, repeated shard names,
        ``out_dir`` is an input folder, or the lm generator without a model.
        ValueError: an unknown type or k < 1. FileNotFoundError: no model folder.
    """
    from vlp.data.shardlists import expand_urls, read_sizes

    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    start = time.monotonic()
    urls = expand_urls(shards, key="--in")
    out = Path(out_dir)
    _check_inputs(urls, out)
    job = NegativesJob(check_types(types), k, seed, field, generator, str(lm_model or ""))
    params = job.params()
    records = _read_records(out, params)
    records = {name: r for name, r in records.items() if name in {Path(u).name for u in urls}}
    todo = [u for u in urls if not _up_to_date(records.get(Path(u).name), u, out / Path(u).name)]
    for url in urls:
        if url not in todo:
            logger.info("%s is up to date; not rewriting", out / Path(url).name)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if todo:
        gen = _make_generator(job, lm_device, lm_batch_size)
        skips = SkipCounter()
        total = read_sizes(todo)
        with tqdm(total=total, disable=None if progress else True, desc="negatives", unit="sample") as bar:
            for i, url in enumerate(todo):
                bar.set_postfix_str(f"shard {i + 1}/{len(todo)}")
                name = Path(url).name
                records[name] = _rewrite_shard(url, out / name, gen, job, skips, bar)
                written.append(name)
                atomic_write_json(out / SUMMARY_FILE, {"params": params, "shards": records, "complete": False})
    pattern = str(out / Path(shards).name) if isinstance(shards, str) else [str(out / Path(s).name) for s in shards]
    summary = _summary(params, urls, records, written, time.monotonic() - start, pattern)
    atomic_write_json(out / SIZES_FILE, {Path(u).name: records[Path(u).name]["samples"] for u in urls})
    atomic_write_json(out / SUMMARY_FILE, summary)
    return summary
