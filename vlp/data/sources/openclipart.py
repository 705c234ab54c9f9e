"""OpenClipart SVGs (Debian ``openclipart-svg``) -> train / val / heldout WebDataset shards.

Each SVG becomes a white-background size×size image, its ``txt`` the primary caption built from
the RDF title and keywords (:mod:`vlp.data.sources.captions`) and its ``json``:

    {"title", "raw_title", "title_source", "keywords", "category", "source", "caption_variants"}

Val and heldout are split off **by title**: their titles are drawn (seeded hash) from the titles
that occur exactly once and whose captions no other file shares, so each such caption names one
image and retrieval on them is well posed; no title or caption variant appears in two splits.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from vlp.data.shards import FIXED_MTIME, INFO_FILE, ShardError, finalize_shards, shards_up_to_date, write_samples
from vlp.data.sources import captions, svg

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "/usr/share/openclipart/svg"
SPLITS = ("train", "val", "heldout")
PREFIX = "openclipart"
CONVERTER_VERSION = 1
SKIP_KINDS = (
    "duplicate_file", "unreadable_file", "too_large", "bad_svg", "no_title", "render_error", "timeout", "blank_render",
)  # fmt: skip
MAX_SKIP_EXAMPLES = 5
STALL_MIN_S = 600  # no result for this long (or 20 × the per-file CPU limit) means a dead worker
INSTALL_HINT = (
    "install them with 'apt-get install -y --no-install-recommends openclipart-svg' (Debian/Ubuntu) "
    "or pass --source DIR"
)


@dataclass
class ClipArt:
    """One usable SVG: where it is and its captions."""

    index: int  # position in the conversion order; the sample key
    rel: str  # path relative to the source folder
    path: str
    raw_title: str
    title: str
    title_source: str
    keywords: list[str]
    variants: list[str]  # caption_variants; variants[0] is the primary caption

    def sample(self, image: tuple[str, bytes]) -> dict:
        ext, data = image
        meta = {
            "title": self.title,
            "raw_title": self.raw_title,
            "title_source": self.title_source,
            "keywords": self.keywords,
            "category": self.rel.split("/")[0] if "/" in self.rel else "",
            "source": self.rel,
            "caption_variants": self.variants,
        }
        return {
            "__key__": f"{self.index:06d}",
            ext: data,
            "txt": self.variants[0].encode("utf-8"),
            "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
        }


def list_svgs(source: Path, seed: int, limit: int, skipped: Counter) -> list[tuple[str, Path]]:
    """(relative path, path) of the SVGs under ``source``: sorted, then shuffled with ``seed`` so
    categories mix, then cut to ``limit`` (0 = all). Several links to one file keep one entry
    (the real file's path when it is in the tree); the others count as ``duplicate_file``."""
    by_target: dict[str, list[Path]] = {}
    for folder, dirs, files in os.walk(source):
        dirs.sort()
        for name in sorted(files):
            if name.lower().endswith(".svg"):
                path = Path(folder, name)
                by_target.setdefault(os.path.realpath(path), []).append(path)
    entries = []  # (relative path, path, number of other links to the same file)
    for paths in by_target.values():
        real = [p for p in paths if not p.is_symlink()]
        path = (real or sorted(paths))[0]
        entries.append((path.relative_to(source).as_posix(), path, len(paths) - 1))
    entries.sort()
    random.Random(seed).shuffle(entries)
    entries = entries[:limit] if limit > 0 else entries
    skipped["duplicate_file"] += sum(links for _, _, links in entries)
    return [(rel, path) for rel, path, _ in entries]


def _fingerprint(entries: list[tuple[str, Path]]) -> str:
    """Hash of the converted files' names and sizes: a changed source means a rewrite."""
    h = hashlib.sha1()
    for rel, path in entries:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1
        h.update(f"{rel}\0{size}\n".encode())
    return h.hexdigest()


def _read_clipart(index: int, rel: str, path: Path, max_bytes: int) -> ClipArt | str:
    """The ClipArt of one file, or a skip kind (unreadable_file, too_large, bad_svg, no_title)."""
    try:
        if path.stat().st_size > max_bytes:
            return "too_large"
        data = path.read_bytes()
    except OSError:
        return "unreadable_file"
    meta = svg.read_metadata(data)
    if isinstance(meta, str):
        return meta
    title, title_source = captions.caption_title(meta.title, Path(rel).stem)
    if not title:
        return "no_title"
    keywords = captions.filter_keywords(meta.keywords, title, meta.creator)
    variants = captions.caption_variants(title, keywords)
    return ClipArt(index, rel, str(path), meta.title, title, title_source, keywords, variants)


def _heldout_candidates(items: list[ClipArt], seed: int) -> list[ClipArt]:
    """Items that may be held out, in seeded-hash order: a metadata title occurring once, and
    no caption variant shared with another item."""
    titles = Counter(item.title for item in items)
    variants = Counter(v for item in items for v in item.variants)
    eligible = [
        item
        for item in items
        if item.title_source == "metadata"
        and titles[item.title] == 1
        and not captions.is_generic_title(item.title)
        and all(variants[v] == 1 for v in item.variants)
    ]
    rank = lambda item: hashlib.sha256(f"{seed}\0{item.title}".encode()).hexdigest()
    return sorted(eligible, key=rank)


def split_counts(heldout: int, val: int, eligible: int) -> tuple[int, int]:
    """(heldout, val) titles to take. When the requested total exceeds half of the ``eligible``
    titles (small ``limit``), both shrink in proportion to that half, so training keeps
    titles too. Raises ShardError when a requested split would get no title."""
    budget = eligible // 2
    if heldout + val <= budget:
        return heldout, val
    h = round(budget * heldout / (heldout + val))
    v = budget - h
    if (heldout > 0 and h == 0) or (val > 0 and v == 0):
        raise ShardError(
            f"only {eligible} unique titles are usable for held-out/val splits; need at least "
            f"{2 * ((heldout > 0) + (val > 0))}: raise --limit or lower --heldout-titles/--val-titles"
        )
    logger.warning(
        "only %d unique titles: using %d heldout and %d val titles (asked %d and %d)", eligible, h, v, heldout, val
    )
    return h, v


def _render(items: list[ClipArt], size: int, timeout_s: float, workers: int) -> Iterator[tuple[int, object]]:
    """(index, (ext, bytes) or skip kind) per item, in order, from a pool of ``workers`` processes.

    Even one worker is a separate process: cairo's global state is reset before every file
    there (:func:`vlp.data.sources.svg.render_task`), which would be unsafe in the caller's
    process, so the images do not depend on the number of workers. Raises ShardError when no
    result comes for a long time: a worker died (a crash inside cairo) and the pool would hang.
    """
    tasks = [(item.index, item.path, size, timeout_s) for item in items]
    stall_s = max(STALL_MIN_S, 20 * timeout_s) if timeout_s > 0 else None
    # spawn: workers start clean (no forked torch/thread state); svg imports little
    with multiprocessing.get_context("spawn").Pool(max(1, workers), initializer=svg.init_worker) as pool:
        results = pool.imap(svg.render_task, tasks)  # chunksize 1: only then has it next(timeout)
        for item in items:
            try:
                yield results.next(timeout=stall_s)
            except multiprocessing.TimeoutError:
                raise ShardError(
                    f"no rendering result in {stall_s:.0f} s, at or after {item.rel}: a worker process "
                    "probably crashed; convert with --limit or move the file away to find it"
                ) from None


class _Router:
    """Streams rendered train samples and keeps the heldout/val candidates' images aside."""

    def __init__(self, items: list[ClipArt], candidates: list[ClipArt], counts: tuple[int, int], stats: dict):
        self.items, self.candidates, self.counts, self.stats = items, candidates, counts, stats
        self.by_index = {item.index: item for item in items}
        self.candidate_ids = {item.index for item in candidates}
        self.images: dict[int, tuple[str, bytes]] = {}
        self.splits: dict[str, list[dict]] = {"val": [], "heldout": []}
        self.captions: dict[str, set[str]] = {split: set() for split in SPLITS}

    def _keep(self, split: str, item: ClipArt, image: tuple[str, bytes]) -> dict:
        self.captions[split].update(item.variants)
        self.stats["formats"][split][image[0]] += 1
        return item.sample(image)

    def train_samples(self, results: Iterable[tuple[int, object]]) -> Iterator[dict]:
        for index, result in results:
            item = self.by_index[index]
            if isinstance(result, str):
                _count_skip(self.stats, result, item.rel)
            elif index in self.candidate_ids:
                self.images[index] = result
            else:
                yield self._keep("train", item, result)
        # candidates in rank order: heldout first, then val; unused ones train after all
        rendered = [item for item in self.candidates if item.index in self.images]
        n_held, n_val = self.counts
        for item in rendered[:n_held]:
            self.splits["heldout"].append(self._keep("heldout", item, self.images[item.index]))
        for item in rendered[n_held : n_held + n_val]:
            self.splits["val"].append(self._keep("val", item, self.images[item.index]))
        for item in rendered[n_held + n_val :]:
            yield self._keep("train", item, self.images[item.index])

    def check_disjoint(self) -> None:
        """Raise AssertionError if a caption (titles included) is in two splits."""
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1 :]:
                shared = self.captions[a] & self.captions[b]
                if shared:
                    raise AssertionError(f"captions shared by {a} and {b}: {sorted(shared)[:5]}")


def _up_to_date(out: Path, params: dict) -> dict | None:
    infos = {split: shards_up_to_date(out / split, {**params, "split": split}) for split in SPLITS}
    return infos if all(info is not None for info in infos.values()) else None


def _require_cairosvg() -> None:
    try:
        import cairosvg  # noqa: F401
    except (ImportError, OSError) as e:  # OSError: cairocffi finds no libcairo
        raise ImportError(svg.CAIROSVG_HINT) from e


def _count_skip(stats: dict, kind: str, rel: str) -> None:
    stats["skipped"][kind] += 1
    examples = stats["examples"].setdefault(kind, [])
    if len(examples) < MAX_SKIP_EXAMPLES:
        examples.append(rel)


def _read_all(entries: list[tuple[str, Path]], max_bytes: int, stats: dict) -> list[ClipArt]:
    items = []
    for index, (rel, path) in enumerate(entries):
        item = _read_clipart(index, rel, path, max_bytes)
        if isinstance(item, str):
            _count_skip(stats, item, rel)
        else:
            items.append(item)
    return items


def write_openclipart_shards(
    out_dir: str | os.PathLike,
    source: str | os.PathLike = DEFAULT_SOURCE,
    size: int = 224,
    heldout_titles: int = 500,
    val_titles: int = 300,
    limit: int = 0,
    max_per_shard: int = 1000,
    workers: int = 2,
    seed: int = 0,
    *,
    max_svg_bytes: int = 4_000_000,
    timeout_s: float = 60.0,
    progress: bool = True,
) -> dict:
    """Convert OpenClipart SVGs into ``out_dir/{train,val,heldout}/openclipart-NNNNNN.tar``.

    Images are size×size RGB (pixels) on white, PNG or, when much smaller, JPEG
    (:func:`vlp.data.sources.svg.encode_image`). ``limit`` > 0 converts only the first
    ``limit`` files of the seeded order; with too few unique titles, heldout/val shrink
    (:func:`split_counts`). Files over ``max_svg_bytes`` bytes or taking over ``timeout_s``
    CPU seconds to render (the slowest real file takes about 7) are skipped; every skip is
    counted by kind (:data:`SKIP_KINDS`). Idempotent: with the same parameters and unchanged
    source files, complete outputs are returned as they are.

    Returns:
        {split: that split's _info.json}: num_samples, num_shards, shards (brace pattern),
        split, the parameters, skipped and skipped_examples (of the whole conversion),
        formats, num_files, heldout_titles_used, val_titles_used, eligible_titles, elapsed_s.

    Raises:
        FileNotFoundError: no SVG folder at ``source`` (the message says how to install it).
        ImportError: cairosvg is not installed. ShardError: bad arguments, too few unique
        titles for the requested splits, or no usable SVG at all.
    """
    src = Path(source).expanduser().resolve()
    if not src.is_dir():
        raise FileNotFoundError(f"OpenClipart SVGs not found at {source}: {INSTALL_HINT}")
    if size < 8 or max_per_shard < 1 or heldout_titles < 0 or val_titles < 0 or limit < 0:
        raise ShardError(
            f"bad arguments: size={size} (>= 8), max_per_shard={max_per_shard} (>= 1), "
            f"heldout_titles={heldout_titles}, val_titles={val_titles}, limit={limit} (>= 0)"
        )
    _require_cairosvg()
    start = time.monotonic()
    stats = {"skipped": Counter(), "examples": {}, "formats": {s: Counter() for s in SPLITS}}
    entries = list_svgs(src, seed, limit, stats["skipped"])
    if not entries:
        raise FileNotFoundError(f"no .svg files under {src}: {INSTALL_HINT}")
    params = {
        "source": "openclipart",
        "source_dir": str(src),
        "source_fingerprint": _fingerprint(entries),
        "size": int(size),
        "heldout_titles": int(heldout_titles),
        "val_titles": int(val_titles),
        "limit": int(limit),
        "max_per_shard": int(max_per_shard),
        "seed": int(seed),
        "max_svg_bytes": int(max_svg_bytes),
        "timeout_s": float(timeout_s),
        "converter_version": CONVERTER_VERSION,
    }
    out = Path(out_dir)
    if (existing := _up_to_date(out, params)) is not None:
        logger.info("OpenClipart shards in %s are up to date; not rewriting", out)
        return existing
    items = _read_all(entries, max_svg_bytes, stats)
    ranked = _heldout_candidates(items, seed)
    counts = split_counts(heldout_titles, val_titles, len(ranked))
    # a few spare candidates replace the ones that fail to render; spares left over train
    router = _Router(items, ranked[: sum(counts) + max(8, sum(counts) // 20)] if sum(counts) else [], counts, stats)
    sizes = _write_splits(out, router, _render(items, size, timeout_s, workers), max_per_shard, progress)
    if not any(sizes.values()):
        raise ShardError(f"{src}: no usable SVG among {len(entries)}; skipped: {dict(stats['skipped'])}")
    num_files = len(entries) + stats["skipped"]["duplicate_file"]
    return _finish(out, params, sizes, stats, num_files, len(ranked), time.monotonic() - start)


def _write_splits(out: Path, router: _Router, results: Iterator, max_per_shard: int, progress: bool) -> dict:
    """Shards of every split from the rendered ``results``; {split: {shard: samples}}."""
    for split in SPLITS:
        (out / split).mkdir(parents=True, exist_ok=True)
        (out / split / INFO_FILE).unlink(missing_ok=True)  # never mistaken for complete mid-rewrite
    bar = tqdm(results, total=len(router.items), disable=None if progress else True, desc="openclipart", unit="svg")
    sizes = {"train": write_samples(router.train_samples(bar), out / "train", PREFIX, max_per_shard, FIXED_MTIME)}
    for split in ("val", "heldout"):
        sizes[split] = write_samples(router.splits[split], out / split, PREFIX, max_per_shard, FIXED_MTIME)
    router.check_disjoint()
    return sizes


def _finish(out: Path, params: dict, sizes: dict, stats: dict, num_files: int, eligible: int, elapsed: float) -> dict:
    """Log the skips, write each split's sizes.json and _info.json; return {split: info}."""
    skipped = {kind: stats["skipped"].get(kind, 0) for kind in SKIP_KINDS}
    if stats["examples"]:  # duplicate links are not worth a warning; they have no examples
        logger.warning(
            "skipped %d of %d SVGs (%s); e.g. %s",
            sum(skipped.values()), num_files, {k: v for k, v in skipped.items() if v},
            "; ".join(f"{kind}: {paths[0]}" for kind, paths in stats["examples"].items()),
        )  # fmt: skip
    shared = {
        "skipped": skipped,
        "skipped_examples": stats["examples"],  # {kind: first few relative paths}
        "num_files": num_files,
        "eligible_titles": eligible,
        "heldout_titles_used": sum(sizes["heldout"].values()),
        "val_titles_used": sum(sizes["val"].values()),
        "elapsed_s": round(elapsed, 1),
    }
    infos = {}
    for split in SPLITS:
        info = {**params, "split": split, **shared, "formats": dict(stats["formats"][split])}
        infos[split] = finalize_shards(out / split, PREFIX, sizes[split], info)
    return infos
