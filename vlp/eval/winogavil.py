"""WinoGAViL (Bitton et al., NeurIPS 2022 Datasets and Benchmarks, arXiv:2207.12576) as DataComp reads
and scores it (mlfoundations/datacomp ``eval_utils/wino_eval.py``): the data, the prompt, the metric.

Each example is a cue word, 5, 6, 10 or 12 candidate images and the candidates a person associated
with the cue. The model ranks the candidates by the cosine similarity of each image to the prompt
``"A <cue>"`` (``"An <cue>"`` when the lower-cased cue starts with a vowel; the cue lower-cased) and
picks as many as there are associations; the example's score is the Jaccard index of the picked set
and the associated set (sklearn's ``jaccard_score``: TP / (TP + FP + FN), 0 when both are empty).
The metrics are DataComp's keys: ``avg_jaccard_score`` over all examples, ``jaccard_score_K`` over the
examples with K candidates (K = 5, 6, 10, 12), ``jaccard_score_5-6`` (at most 6) and
``jaccard_score_10-12`` (at least 10; DataComp's main metric); nan for a group without examples.
Ties between similarities are broken as numpy's ``argsort`` breaks them, as in DataComp.

The data: DataComp's ``download_evalsets.py`` calls ``datasets.load_dataset("nlphuji/winogavil",
split="test", cache_dir=DATA/hf_cache)``; the dataset's loading script (config ``TEST``, version
1.1.0) unpacks ``winogavil_images.zip`` under ``DATA/hf_cache/downloads/extracted/<hash>/`` and
writes the rows, as ``datasets`` does for a loading script, to one Arrow stream::

    DATA/hf_cache/nlphuji___winogavil/TEST/1.1.0/<hash>/winogavil-test.arrow

with the columns ``cue`` (string), ``candidates`` and ``associations`` (lists of image names),
``candidate_images`` (a list of ``datasets.Image``: structs of ``bytes``, null, and ``path``, the
absolute path of ``.../downloads/extracted/<hash>/winogavil_images/<name>.jpg``) and others not read
here; pyarrow reads it (the ``datacomp`` extra; ``datasets`` is not needed). A path that is not
there (the data folder moved) is looked for under the cache the Arrow file is in, from its
``downloads/`` part on; an example with a candidate image that is not found is skipped and counted
(``missing_image``), and so is, at scoring, one with an image that cannot be decoded.

Legend: N distinct candidate images, E examples, D feature dim.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

from vlp.data.decode import SkipCounter
from vlp.eval.benchmark_wds import DatasetMissing
from vlp.eval.datasets import EvalData, EvalDataError

CACHE_FOLDER = "nlphuji___winogavil"  # datasets' cache folder of the hub dataset nlphuji/winogavil
COLUMNS = ("cue", "candidates", "associations", "candidate_images")
# where a split's Arrow files are found from a folder the user names: the files' own folder,
# nlphuji___winogavil/, a datasets cache_dir, DataComp's data folder (holding hf_cache/)
LAYOUTS = ("{file}", "*/*/*/{file}", "*winogavil/*/*/*/{file}", "hf_cache/*winogavil/*/*/*/{file}")
# metric key -> which examples, by their number of candidates (DataComp's groups)
GROUPS = {
    "jaccard_score_5": lambda n: n == 5,
    "jaccard_score_6": lambda n: n == 6,
    "jaccard_score_10": lambda n: n == 10,
    "jaccard_score_12": lambda n: n == 12,
    "jaccard_score_5-6": lambda n: n <= 6,
    "jaccard_score_10-12": lambda n: n >= 10,
}


@dataclass
class WinogavilData(EvalData):
    """``images``: the distinct candidate images (paths, or bytes where the Arrow file holds them);
    per example: its cue, its candidates (indices into ``images``, in the dataset's order) and
    which of them are associated with the cue."""

    cues: list[str] = field(default_factory=list)
    candidates: list[list[int]] = field(default_factory=list)
    associated: list[list[bool]] = field(default_factory=list)


def clip_prompt(cue: str) -> str:
    """DataComp's text for a cue: ``"An <cue>"`` when it starts with a vowel, else ``"A <cue>"``,
    the cue lower-cased."""
    item = cue.lower()
    return f"An {item}" if item[:1] and item[0] in "aeiou" else f"A {item}"


def _jaccard(true_K: np.ndarray, pred_K: np.ndarray) -> float:
    """sklearn's binary ``jaccard_score``: TP / (TP + FP + FN); 0.0 when there is neither."""
    union = int(np.sum(true_K | pred_K))
    return int(np.sum(true_K & pred_K)) / union if union else 0.0


def winogavil_metrics(scores: Sequence, associated: Sequence) -> dict:
    """DataComp's metrics (module docstring) from, per example, the similarity of each candidate to
    the prompt (``scores[e]``, [K]) and which candidates are associated (``associated[e]``, [K] bool);
    ``num_samples`` is the number of examples."""
    jaccards, sizes = [], []
    for scores_K, true_K in zip(scores, associated):
        scores_K, true_K = np.asarray(scores_K), np.asarray(true_K, dtype=bool)
        k = int(true_K.sum())
        picked = np.argsort(scores_K)[-k:]  # k = 0 picks all, as DataComp's [-0:] does
        pred_K = np.zeros(len(scores_K), dtype=bool)
        pred_K[picked] = True
        jaccards.append(_jaccard(true_K, pred_K))
        sizes.append(len(scores_K))
    jaccards_E, sizes_E = np.asarray(jaccards, dtype=np.float64), np.asarray(sizes)

    def mean(mask_E) -> float:
        return float(jaccards_E[mask_E].mean()) if np.any(mask_E) else math.nan

    out = {"avg_jaccard_score": mean(np.ones(len(jaccards_E), dtype=bool))}
    out.update({key: mean(np.array([group(n) for n in sizes_E], dtype=bool)) for key, group in GROUPS.items()})
    return {**out, "num_samples": len(jaccards)}


def find_arrow_files(folders: Sequence[str | os.PathLike], split: str = "test") -> list[Path]:
    """The Arrow files of ``split`` under the first of ``folders`` that has them (each folder tried
    as each of :data:`LAYOUTS`; an ``.arrow`` file is taken as it is). Several cached builds: the
    newest folder's files. Raises DatasetMissing naming the folders tried."""
    pattern = f"winogavil-{split}*.arrow"
    for folder in folders:
        path = Path(folder).expanduser()
        if path.suffix == ".arrow" and path.is_file():
            return [path]
        if not path.is_dir():
            continue
        for layout in LAYOUTS:
            files = [f for f in path.glob(layout.format(file=pattern)) if not f.parent.name.endswith(".incomplete")]
            if files:
                newest = max({f.parent for f in files}, key=lambda d: (d.stat().st_mtime, str(d)))
                return sorted(f for f in files if f.parent == newest)
    tried = ", ".join(str(Path(f)) for f in folders)
    raise DatasetMissing(
        f"no {pattern} under {tried} (DataComp's download_evalsets.py leaves "
        f"DATA/hf_cache/{CACHE_FOLDER}/TEST/1.1.0/<hash>/winogavil-{split}.arrow)"
    )


def _cache_root(file: Path) -> Path | None:
    """The ``datasets`` cache folder holding ``file`` (``<cache>/*winogavil/<config>/<version>/<hash>/``)."""
    parents = file.parents
    return parents[4] if len(parents) > 4 and parents[3].name.endswith("winogavil") else None


def _image(entry, cache_root: Path | None) -> str | bytes:
    """A ``datasets.Image`` struct's bytes, else its path (moved under ``cache_root`` from its
    ``downloads/`` part on when it is not there); '' when it has neither."""
    if not isinstance(entry, dict):
        return ""
    if entry.get("bytes"):
        return entry["bytes"]
    path = entry.get("path") or ""
    if not path or os.path.isfile(path) or cache_root is None:
        return path
    parts = PurePosixPath(path.replace("\\", "/")).parts
    if "downloads" in parts:
        moved = cache_root.joinpath(*parts[len(parts) - 1 - parts[::-1].index("downloads") :])
        if moved.is_file():
            return str(moved)
    return path


def _strings(value, key: str, where: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise EvalDataError(f"{where}: {key!r} must be a list of strings, got {value!r:.80}")
    return value


def read_columns(path: Path, names: Sequence[str]) -> dict[str, list]:
    """The columns ``names`` of the Arrow stream file ``path`` (as `datasets` writes its cache)."""
    try:
        import pyarrow as pa
        import pyarrow.ipc
    except ImportError:
        raise EvalDataError(f"{path}: WinoGAViL's Arrow file needs pyarrow: pip install 'vlp[datacomp]'") from None
    try:
        with pa.memory_map(str(path)) as source:
            table = pyarrow.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid as e:
        raise EvalDataError(f"WinoGAViL: {path}: not an Arrow stream ({e})") from None
    missing = [n for n in names if n not in table.column_names]
    if missing:
        raise EvalDataError(f"WinoGAViL: {path}: no column {missing[0]!r} (has {', '.join(table.column_names)})")
    return {n: table.column(n).to_pylist() for n in names}


def read_winogavil(files: Sequence[Path], name: str) -> WinogavilData:
    """The examples of the Arrow ``files`` (one split); see :func:`load_winogavil`."""
    skips, images, index = SkipCounter(), [], {}
    cues, candidates, associated = [], [], []
    for file in files:
        try:
            columns = read_columns(file, COLUMNS)
        except OSError as e:
            raise EvalDataError(f"WinoGAViL: {e}") from None
        root = _cache_root(file)
        for row, (cue, names, chosen, entries) in enumerate(zip(*(columns[c] for c in COLUMNS))):
            where = f"{file}: row {row}"
            if not isinstance(cue, str) or not cue.strip():
                raise EvalDataError(f"{where}: 'cue' must be a non-empty string, got {cue!r:.80}")
            names, chosen = _strings(names, "candidates", where), _strings(chosen, "associations", where)
            if not isinstance(entries, list) or len(entries) != len(names):
                raise EvalDataError(f"{where}: {len(names)} candidates but candidate_images is {entries!r:.80}")
            found = [_image(entry, root) for entry in entries]
            missing = next((f for f in found if not f or (isinstance(f, str) and not os.path.isfile(f))), None)
            if missing is not None:
                skips.add("missing_image", where, str(missing))
                continue
            cues.append(cue)
            candidates.append([index.setdefault(f, len(index)) for f in found])
            chosen = set(chosen)
            associated.append([n in chosen for n in names])
    images = list(index)
    if not cues:
        raise EvalDataError(f"{files[0]}: no usable WinoGAViL example; skipped: {dict(skips.counts) or 'none'}")
    return WinogavilData(
        images=images, name=name, skipped=dict(skips.counts), cues=cues, candidates=candidates, associated=associated
    )


def load_winogavil(path: str | os.PathLike, split: str = "test") -> WinogavilData:
    """WinoGAViL from a Hugging Face ``datasets`` cache (module docstring): ``path`` is DataComp's
    data folder (holding ``hf_cache/``), a ``datasets`` cache folder, its ``nlphuji___winogavil``
    folder, the folder of the Arrow file or the file. Raises DatasetMissing when no Arrow file of
    ``split`` is there; EvalDataError for a file that cannot be read, a row of the wrong shape, or
    no example with all its images."""
    return read_winogavil(find_arrow_files([path], split), "winogavil")
