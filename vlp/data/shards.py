"""Write WebDataset tar shards, here from the synthetic shapes generator; the writer for captions
files is :mod:`vlp.data.caption_files`, for installed datasets :mod:`vlp.data.sources`.

A folder gets ``{prefix}-NNNNNN.tar`` shards, ``sizes.json`` ({shard basename: samples}) and
``_info.json``. Everything is written under a temporary name and renamed into place, so a
crash never leaves a file that looks complete.
"""

from __future__ import annotations

import errno
import io
import itertools
import json
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from pathlib import Path

import webdataset as wds
from tqdm import tqdm

from vlp.data import synthetic
from vlp.data.extra_captions import PAIR_GROUP_LIMIT

logger = logging.getLogger(__name__)

SIZES_FILE = "sizes.json"
INFO_FILE = "_info.json"
# A fixed member mtime makes synthetic and converted (vlp.data.sources) shards byte-identical across runs.
FIXED_MTIME = 0


class ShardError(ValueError):
    """A fatal problem with the inputs of a shard-writing job (message names file/column)."""


# Errors of writing that name no file: disk full, quota, file too large, read-only file system.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS)


def unwritable_output(error: OSError, out_dir: str | os.PathLike) -> str | None:
    """The one-line message for ``error`` when it came from writing ``out_dir`` (it names that folder,
    a path inside it or one of its parents, or no file with a disk-full or read-only errno), else
    None: an input's error keeps its own message."""
    out = Path(out_dir).expanduser().absolute()
    names = [Path(os.fsdecode(n)).expanduser().absolute() for n in (error.filename, error.filename2) if n]
    ours = any(n.is_relative_to(out) or out.is_relative_to(n) for n in names)
    if not ours and (names or error.errno not in _WRITE_ERRNOS):
        return None
    reason = error.strerror or str(error)
    if names and names[0] != out:
        reason += f": {error.filename}"
    return f"cannot write to {out_dir} ({reason}); choose another --out"


def atomic_write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON to ``path`` via a temporary sibling file + os.replace."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)


def shard_name(prefix: str, i: int) -> str:
    """Basename of shard ``i``: ``{prefix}-{i:06d}.tar``."""
    return f"{prefix}-{i:06d}.tar"


def brace_pattern(prefix: str, num_shards: int) -> str:
    """Brace pattern covering shards 0..num_shards-1, e.g. ``data-{000000..000009}.tar``."""
    if num_shards <= 0:
        return ""
    return f"{prefix}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def write_samples(
    samples: Iterable[dict], out_dir: Path, prefix: str, max_per_shard: int, mtime: int
) -> dict[str, int]:
    """Write encoded samples (``__key__`` + bytes fields) into shards of <= max_per_shard.

    Returns {shard basename: samples}. Raises ValueError if max_per_shard < 1.
    """
    if max_per_shard < 1:
        raise ValueError(f"max_samples_per_shard must be >= 1, got {max_per_shard}")
    sizes: dict[str, int] = {}
    it = iter(samples)
    while (first := next(it, None)) is not None:
        name = shard_name(prefix, len(sizes))
        tmp = out_dir / (name + ".tmp")
        count = 0
        try:
            # An integer mtime matters: tarfile adds a 1 KiB PAX header to every member whose
            # mtime is a float (webdataset's default, time.time()), doubling small shards.
            with wds.TarWriter(str(tmp), encoder=False, mtime=mtime) as writer:
                for sample in itertools.chain([first], itertools.islice(it, max_per_shard - 1)):
                    writer.write(sample)
                    count += 1
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, out_dir / name)
        sizes[name] = count
    return sizes


def _remove_stale_shards(out_dir: Path, prefix: str, keep: dict[str, int]) -> None:
    """Delete ``{prefix}-NNNNNN.tar`` files from an earlier, larger run (readers may glob)."""
    pattern = re.compile(re.escape(prefix) + r"-\d{6}\.tar")
    for path in out_dir.iterdir():
        if pattern.fullmatch(path.name) and path.name not in keep:
            logger.info("removing stale shard %s", path)
            path.unlink()


def finalize_shards(out_dir: Path, prefix: str, sizes: dict[str, int], info: dict) -> dict:
    """Write sizes.json and _info.json (atomically) and return the full info dict."""
    _remove_stale_shards(out_dir, prefix, sizes)
    full = {
        "num_samples": sum(sizes.values()),
        "num_shards": len(sizes),
        "shards": brace_pattern(prefix, len(sizes)),
        **info,
    }
    atomic_write_json(out_dir / SIZES_FILE, sizes)
    atomic_write_json(out_dir / INFO_FILE, full)
    return full


def read_sizes(path_or_dir: str | os.PathLike) -> dict[str, int]:
    """Read ``sizes.json`` ({shard basename: num samples}).

    ``path_or_dir`` is the shard folder, the sizes.json file itself, or any file in the
    folder (a shard, _info.json). Raises FileNotFoundError when there is no sizes.json.
    """
    path = Path(path_or_dir)
    if path.is_dir():
        path = path / SIZES_FILE
    elif path.name != SIZES_FILE:
        path = path.parent / SIZES_FILE
    if not path.is_file():
        raise FileNotFoundError(f"no {SIZES_FILE} at {path}")
    with open(path, encoding="utf-8") as f:
        return {str(k): int(v) for k, v in json.load(f).items()}


def shards_up_to_date(out_dir: Path, params: dict) -> dict | None:
    """Return the existing info if it was written with ``params`` and every shard is there."""
    try:
        with open(out_dir / INFO_FILE, encoding="utf-8") as f:
            info = json.load(f)
        sizes = read_sizes(out_dir)
    except (OSError, ValueError):
        return None
    if any(info.get(k) != v for k, v in params.items()) or len(sizes) != info.get("num_shards"):
        return None
    if sum(sizes.values()) != info["num_samples"] or not all((out_dir / n).is_file() for n in sizes):
        return None
    return info


def _synthetic_samples(
    seed: int, start: int, count: int, image_size: int, single_group: bool, progress: bool
) -> Iterator[dict]:
    """Encoded synthetic samples (png, txt, json) for indices start .. start+count-1."""
    scenes = synthetic.iter_scenes(seed, start, count, image_size=image_size, single_group=single_group)
    for scene in tqdm(scenes, total=count, disable=None if progress else True, desc="shapes", unit="img"):
        yield _encode_scene(scene, f"{scene.meta['index']:09d}")


def _encode_scene(scene: synthetic.Scene, key: str) -> dict:
    buf = io.BytesIO()
    scene.image.save(buf, format="PNG")
    return {
        "__key__": key,
        "png": buf.getvalue(),
        "txt": scene.caption.encode("utf-8"),
        "json": json.dumps(scene.meta).encode("utf-8"),
    }


def pair_group_size(kinds: tuple[str, ...], every_kind: bool) -> int:
    """Samples per minimal pair (2) or, with ``every_kind``, per group (the scene and one per kind)."""
    return 1 + len(kinds) if every_kind else 2


def _pair_samples(
    seed: int,
    start: int,
    count: int,
    image_size: int,
    kinds: tuple[str, ...],
    every_kind: bool,
    skipped: Counter,
    progress: bool,
) -> Iterator[dict]:
    """``count`` samples: scenes from index ``start`` on, each followed by its counterfactual, or by
    one of every kind with ``every_kind`` (all with ``"pair": index`` in their JSON); scenes without
    them are skipped and counted."""
    from vlp.data.synthetic_counterfactual import counterfactual_group, counterfactual_scene

    index, written = start, 0
    with tqdm(total=count, disable=None if progress else True, desc="shape pairs", unit="img") as bar:
        while written < count:
            if every_kind:
                scene, cfs = counterfactual_group(seed, index, kinds, image_size=image_size)
                suffixes = [f"_cf{j}" for j in range(len(cfs))]
            else:
                scene, cf = counterfactual_scene(seed, index, kinds, image_size=image_size)
                cfs, suffixes = ([] if cf is None else [cf]), ["_cf"]
            if not cfs:
                skipped["no_counterfactual"] += 1
            else:
                for member, suffix in zip([scene, *cfs], ["", *suffixes]):
                    member.meta["pair"] = index
                    yield _encode_scene(member, f"{index:09d}{suffix}")
                written += 1 + len(cfs)
                bar.update(1 + len(cfs))
            index += 1


def write_synthetic_shards(
    out_dir: str | os.PathLike,
    num_samples: int,
    *,
    seed: int = 0,
    start_index: int = 0,
    image_size: int = 64,
    single_group: bool = False,
    max_samples_per_shard: int = 1000,
    prefix: str = "shapes",
    progress: bool = True,
    counterfactual_pairs: tuple[str, ...] = (),
    every_kind: bool = False,
) -> dict:
    """Write ``num_samples`` synthetic shapes scenes (indices start_index..) as shards.

    With ``counterfactual_pairs`` (kinds of :data:`vlp.data.synthetic_counterfactual.CHANGE_TYPES`)
    every scene is followed by its counterfactual: ``num_samples / 2`` minimal pairs, each pair's
    JSON holding ``"pair": index``; scenes with no counterfactual of those kinds are skipped and
    counted in ``skipped``. With ``every_kind`` too, every scene is followed by one counterfactual
    of each kind (a minimal group of ``1 + len(counterfactual_pairs)`` samples, keys ``<index>_cf<j>``);
    scenes where a kind does not apply are skipped. For ``loss.pair_weight``: the stream's shuffle
    buffer keeps each pair or group together (:func:`vlp.data.stream.pair_units`), so they share a
    batch.

    Idempotent: when ``out_dir/_info.json`` records the same parameters and all its shards
    exist, nothing is written and the stored info is returned.

    Returns:
        The _info.json dict: num_samples, num_shards, shards (brace pattern relative to
        out_dir), source="synthetic", skipped={}, the generation parameters, classnames
        (zeroshot_classnames()) and templates (ZEROSHOT_TEMPLATES).

    Raises:
        ValueError: num_samples < 1, max_samples_per_shard < 1, or bad seed/index/size; with
            counterfactual_pairs: num_samples or max_samples_per_shard not a multiple of the pair
            or group size, unknown kinds, or single_group (a one-group scene has nothing to swap
            and no pair partner to share); every_kind without counterfactual_pairs, or with more
            kinds than a group may hold.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if counterfactual_pairs:
        from vlp.data.synthetic_counterfactual import check_kinds

        check_kinds(counterfactual_pairs)
        size = pair_group_size(counterfactual_pairs, every_kind)
        if every_kind and (size > PAIR_GROUP_LIMIT or len(set(counterfactual_pairs)) < len(counterfactual_pairs)):
            raise ValueError(
                f"every_kind needs distinct kinds, at most {PAIR_GROUP_LIMIT - 1}; got {list(counterfactual_pairs)}"
            )
        if num_samples % size or max_samples_per_shard % size or single_group:
            raise ValueError(
                f"counterfactual_pairs needs num_samples and max_samples_per_shard multiples of {size} (pairs and "
                "groups never straddle shards) and single_group off; got "
                f"{num_samples}, {max_samples_per_shard}, {single_group}"
            )
    elif every_kind:
        raise ValueError("every_kind needs counterfactual_pairs: the kinds of each group's counterfactuals")
    out = Path(out_dir)
    params = {
        "source": "synthetic",
        "num_samples": int(num_samples),
        "seed": int(seed),
        "start_index": int(start_index),
        "image_size": int(image_size),
        "single_group": bool(single_group),
        "max_samples_per_shard": int(max_samples_per_shard),
        "prefix": prefix,
        "generator_version": synthetic.SYNTHETIC_VERSION,
    }
    if counterfactual_pairs:  # only then, so that shards written before this option stay up to date
        params["counterfactual_pairs"] = list(counterfactual_pairs)
    if every_kind:
        params["every_kind"] = True
    if out.is_dir():
        existing = shards_up_to_date(out, params)
        if existing is not None:
            logger.info("shards in %s are up to date; not rewriting", out)
            return existing
    out.mkdir(parents=True, exist_ok=True)
    # Drop the old info first so an interrupted rewrite is never mistaken for complete.
    (out / INFO_FILE).unlink(missing_ok=True)
    skipped: Counter = Counter()
    if counterfactual_pairs:
        kinds = tuple(counterfactual_pairs)
        samples = _pair_samples(seed, start_index, num_samples, image_size, kinds, every_kind, skipped, progress)
    else:
        samples = _synthetic_samples(seed, start_index, num_samples, image_size, single_group, progress)
    sizes = write_samples(samples, out, prefix, max_samples_per_shard, FIXED_MTIME)
    extra = {k: v for k, v in params.items() if k != "num_samples"}
    extra.update(classnames=synthetic.zeroshot_classnames(), templates=list(synthetic.ZEROSHOT_TEMPLATES))
    return finalize_shards(out, prefix, sizes, {"skipped": dict(skipped), **extra})
