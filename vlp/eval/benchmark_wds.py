"""CLIP_benchmark's WebDataset layout, read exactly as CLIP_benchmark reads it: datasets by name.

``vlp eval --dataset wds/NAME --dataset_root ROOT`` finds the dataset in ``ROOT`` (a template with
CLIP_benchmark's keys: ``{dataset}`` is NAME, ``{dataset_cleaned}`` NAME with ``/`` -> ``-``)::

    ROOT/
        {split}/nshards.txt            the number n of shards (required)
        {split}/0.tar ... {n-1}.tar    samples: an image (webp, png, jpg, jpeg) and
                                       cls (class index) | npy (multilabel: a 0/1 vector of C) |
                                       txt (captions, one a line); DataComp's sets add npy metadata
        dataset_type.txt               classification (default) | retrieval | multilabel
        classnames.txt                 one class name a line (classification, multilabel)
        zeroshot_classification_templates.txt   one template with {c} a line (classification, multilabel)

That is what ``clip_benchmark.webdataset_builder`` writes and the ``clip-benchmark/wds_*`` datasets
on the Hugging Face hub hold. A retrieval sample's ``txt`` holds all of its image's captions, one a
line: each line is a caption (reading it as one caption, as a plain shard's ``txt`` is read, would
give wrong recalls). The task follows from ``dataset_type.txt`` unless one is named; a multilabel set
is zeroshot_classification scored by mean average precision, as CLIP_benchmark scores it. A set that
DataComp scores with its own metrics (:mod:`vlp.eval.datacomp_metrics`, by name) has each sample's
``npy`` metadata row read too.

``ROOT`` is a folder, an http(s) URL, a hub repository (``hf://datasets/ORG/REPO``) or a command
(``pipe:CMD PREFIX``): as CLIP_benchmark joins paths to its root, a file's path is appended to it,
so ``pipe:CMD PREFIX`` reads ``PREFIX/test/0.tar`` from the output of ``CMD PREFIX/test/0.tar``
(shards as webdataset's ``pipe:`` urls, the metadata files the same way). Remote shards are streamed
and their images spooled to local disk (:class:`vlp.eval.tar_index.Spool`), never held in memory.

Legend: N images.
"""

from __future__ import annotations

import io
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from vlp.eval.datacomp_metrics import EVALUATORS, evaluator_name
from vlp.eval.datasets import EvalData, EvalDataError, collect, load_templates

PREFIX = "wds/"
TASK_OF_TYPE = {
    "classification": "zeroshot_classification",
    "multilabel": "zeroshot_classification",
    "retrieval": "zeroshot_retrieval",
}
HF_DATASETS = "https://huggingface.co/datasets/"
# DataComp's tasks that are no WebDataset: read from the Hugging Face `datasets` cache its
# download_evalsets.py leaves (DATA/hf_cache), by the task named here (vlp/eval/winogavil.py)
HF_CACHE_TASKS = {"misc/winogavil": "winogavil"}
PIPE = "pipe:"
PIPE_TIMEOUT_S = 600


class DatasetMissing(EvalDataError):
    """A layout file that is not there (a suite skips such a dataset and goes on)."""


@dataclass(frozen=True)
class BenchmarkDataset:
    """Where one CLIP_benchmark dataset lives: ``name`` as given (``wds/imagenet1k``), the folder or
    URL its metadata is read from and the one its tars are read from (they differ on the hub)."""

    name: str
    metadata: str
    tars: str
    base: str = ""  # the folder of the root before its first key: DataComp's data folder, holding hf_cache/

    @property
    def short(self) -> str:
        return self.name[len(PREFIX) :] if self.name.startswith(PREFIX) else self.name


def locate(name: str, root: str) -> BenchmarkDataset:
    """The dataset ``name`` (``wds/NAME``) under ``root`` (CLIP_benchmark's template keys allowed).

    ``hf://datasets/ORG/REPO[/PATH]`` and ``https://huggingface.co/datasets/ORG/REPO/tree/BRANCH``
    are read as CLIP_benchmark reads the hub: metadata from ``raw/``, tars from ``resolve/``.
    """
    if not name.startswith(PREFIX):
        raise EvalDataError(f"--dataset {name}: vlp reads CLIP_benchmark's WebDataset layout: wds/NAME")
    short = name[len(PREFIX) :]
    try:
        folder = root.format(dataset=short, dataset_cleaned=short.replace("/", "-"))
    except (KeyError, IndexError) as e:
        raise EvalDataError(
            f"--dataset_root {root}: unknown key {e} (keys: {{dataset}}, {{dataset_cleaned}})"
        ) from None
    folder = folder.rstrip("/")
    if folder.startswith("hf://datasets/"):
        org_repo = "/".join(folder[len("hf://datasets/") :].split("/")[:2])
        path = "/".join(folder[len("hf://datasets/") :].split("/")[2:])
        folder = f"{HF_DATASETS}{org_repo}/tree/main" + (f"/{path}" if path else "")
    if folder.startswith(HF_DATASETS) and "/tree/" in folder:
        head, _, rest = folder.partition("/tree/")
        return BenchmarkDataset(name, f"{head}/raw/{rest}", f"{head}/resolve/{rest}")
    base = (root[: root.index("{")].rpartition("/")[0] or ".") if "{" in root else folder
    return BenchmarkDataset(name, folder, folder, base)


def _read(location: str, required: bool = True) -> str | None:
    """A metadata file's text (local, http(s) or ``pipe:`` command output); None when optional and absent."""
    if location.startswith(PIPE):
        return _read_pipe(location, required)
    try:
        if "://" in location:
            with urllib.request.urlopen(location, timeout=60) as response:  # noqa: S310 - the user's own URL
                return response.read().decode("utf-8")
        with open(location, encoding="utf-8") as f:
            return f.read()
    except FileNotFoundError:
        if required:
            raise DatasetMissing(f"{location}: not found (CLIP_benchmark's layout needs it)") from None
        return None
    except OSError as e:
        if getattr(e, "code", None) == 404 and not required:
            return None
        kind = DatasetMissing if getattr(e, "code", None) == 404 else EvalDataError
        raise kind(f"{location}: cannot read ({e})") from None
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{location}: not UTF-8 text ({e})") from None


def _read_pipe(location: str, required: bool) -> str | None:
    """The output of the command ``location`` names; a command that fails is a file that is not there."""
    try:
        done = subprocess.run(location[len(PIPE) :], shell=True, capture_output=True, timeout=PIPE_TIMEOUT_S)  # noqa: S602 - the user's own command
    except subprocess.TimeoutExpired:
        raise EvalDataError(f"{location}: no answer in {PIPE_TIMEOUT_S} s") from None
    if done.returncode != 0:
        if not required:
            return None
        why = done.stderr.decode("utf-8", "replace").strip().splitlines()[-1:] or [""]
        raise DatasetMissing(f"{location}: the command failed (exit {done.returncode}) {why[0][:200]}".rstrip())
    try:
        return done.stdout.decode("utf-8")
    except UnicodeDecodeError as e:
        raise EvalDataError(f"{location}: not UTF-8 text ({e})") from None


def dataset_type(ds: BenchmarkDataset) -> str:
    text = _read(f"{ds.metadata}/dataset_type.txt", required=False)
    kind = (text or "classification").strip().lower()
    if kind not in ("classification", "retrieval", "multilabel"):
        raise EvalDataError(
            f"{ds.metadata}/dataset_type.txt: '{kind}' (expected classification, retrieval or multilabel)"
        )
    return kind


def shard_urls(ds: BenchmarkDataset, split: str) -> list[str]:
    if ds.short in HF_CACHE_TASKS:  # its Arrow files (DatasetMissing when not there)
        from vlp.eval.winogavil import find_arrow_files

        return [str(f) for f in find_arrow_files([ds.metadata, ds.base], split)]
    where = f"{ds.metadata}/{split}/nshards.txt"
    text = _read(where)
    try:
        n = int(text.strip())
    except ValueError:
        raise EvalDataError(f"{where}: expected the number of shards, got {text.strip()[:40]!r}") from None
    if n < 1:
        raise EvalDataError(f"{where}: {n} shards")
    return [f"{ds.tars}/{split}/{i}.tar" for i in range(n)]


def default_task(ds: BenchmarkDataset) -> str:
    return HF_CACHE_TASKS.get(ds.short) or TASK_OF_TYPE[dataset_type(ds)]


def load(ds: BenchmarkDataset, task: str, split: str = "test", classnames=None, templates=None) -> EvalData:
    """The dataset's ``split`` as the EvalData of ``task`` (zeroshot_classification or
    zeroshot_retrieval); ``classnames`` / ``templates`` override the dataset's files. A multilabel
    set gets ``multilabels``; a set DataComp scores with its own metrics, ``group_metadata``."""
    from vlp.data.decode import SkipCounter
    from vlp.eval.datasets import _shard_rows, load_classnames, spool_for

    if ds.short in HF_CACHE_TASKS:
        from vlp.eval.winogavil import read_winogavil

        if task != HF_CACHE_TASKS[ds.short]:
            raise EvalDataError(f"{ds.name}: read by the task {HF_CACHE_TASKS[ds.short]} only, not {task}")
        return read_winogavil([Path(f) for f in shard_urls(ds, split)], ds.name)
    urls = shard_urls(ds, split)
    skips, spool = SkipCounter(), spool_for(urls)
    if task == "zeroshot_retrieval":
        return collect(ds.name, ds.name, _shard_rows(urls, skips, _all_captions, spool), skips, spool=spool)
    if task != "zeroshot_classification":
        raise EvalDataError(
            f"{ds.name}: task {task} on a CLIP_benchmark dataset (zeroshot_classification, zeroshot_retrieval)"
        )
    names_text = None if classnames else _read(f"{ds.metadata}/classnames.txt")
    names = load_classnames(classnames) if classnames else [line.strip() for line in names_text.splitlines()]
    if templates:
        templates = load_templates(templates)
    else:
        text = _read(f"{ds.metadata}/zeroshot_classification_templates.txt")
        templates = load_templates([line.strip() for line in text.splitlines()])
    extra = {}
    if dataset_type(ds) == "multilabel":
        convert = _multilabel(len(names))
    else:
        group = evaluator_name(ds.name)
        convert = _single_label(len(names), group and EVALUATORS[group].needs_metadata)
        extra = {"group_metrics": group}
    rows = _shard_rows(urls, skips, convert, spool)
    return collect(ds.name, ds.name, rows, skips, classnames=names, templates=templates, spool=spool, **extra)


def _npy(raw: dict) -> np.ndarray | None:
    """The sample's ``npy`` member as a 1-D array (None when absent or not a plain npy array)."""
    data = raw.get("npy")
    if not isinstance(data, (bytes, bytearray)):
        return None
    try:
        return np.load(io.BytesIO(data), allow_pickle=False).reshape(-1)
    except (ValueError, OSError, EOFError):
        return None


def _single_label(num_classes: int, with_metadata: bool):
    """A sample's record: its ``cls`` label, and its metadata row when its DataComp metrics need one
    (None when absent: those metrics are then left out, the accuracies are not)."""

    def label(raw: dict, meta: dict, where: str) -> dict | str:
        try:
            value = int(raw["cls"])
        except (KeyError, ValueError):
            return "missing_label"
        if not 0 <= value < num_classes:
            raise EvalDataError(f"{where}: label {value} outside the {num_classes} class names")
        if not with_metadata:
            return {"labels": value}
        row = _npy(raw)
        if row is not None and (row.size == 0 or not np.all(np.isfinite(row)) or np.any(row != np.round(row))):
            raise EvalDataError(f"{where}: npy metadata {row.tolist()[:12]} is not a row of integers")
        return {"labels": value, "group_metadata": None if row is None else row.astype(np.int64)}

    return label


def _multilabel(num_classes: int):
    """A sample's record: its ``npy`` 0/1 vector of the C classes (CLIP_benchmark's multilabel label)."""

    def label(raw: dict, meta: dict, where: str) -> dict | str:
        if "npy" not in raw:
            return "missing_label"
        vector = _npy(raw)
        if vector is None:
            return "bad_label"
        if vector.size != num_classes:
            raise EvalDataError(f"{where}: multilabel vector of {vector.size} for {num_classes} class names")
        return {"multilabels": vector.astype(np.float32)}

    return label


def _all_captions(raw: dict, meta: dict, where: str) -> dict | str:
    """Every line of the sample's ``txt`` is a caption of its image (CLIP_benchmark's ``str.splitlines``)."""
    from vlp.data.decode import decode_caption

    text, problem = decode_caption(raw.get("txt"))
    if text is None:
        return problem
    return {"captions": text.splitlines()}  # as CLIP_benchmark: a blank line inside is a (blank) caption
