"""Evaluation data layouts shared by the tasks (ImageFolder, JSONL, WebDataset) -> :class:`EvalData`,
and the row helpers the tasks' own loaders (in :mod:`vlp.eval.tasks`) build on.

``EvalData.images`` holds absolute path strings, or for WebDataset shards where each image's bytes
are (:class:`vlp.eval.tar_index.TarSlice`: read when the image is encoded, so an eval set held for
a whole training run costs its labels and captions only): in a local shard itself, in a spool file
for a remote one (streamed once, its images written to local disk as they pass); :class:`ImageList`
decodes each lazily. Fatal problems raise :class:`EvalDataError`
naming the file (and line); bad rows and missing images are skipped and counted by kind in
``EvalData.skipped``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from vlp.data.decode import SkipCounter, decode_caption, decode_image
from vlp.data.images import ImagePolicy
from vlp.data.shardlists import DataConfigError, expand_urls
from vlp.data.textfiles import read_text, text_lines
from vlp.eval.tar_index import Spool, TarSlice, indexed_samples, is_local

IMAGE_KEYS = ("jpg", "jpeg", "png", "webp", "bmp")  # shard members tried, in order, for the image
IMAGE_EXTENSIONS = tuple(f".{k}" for k in IMAGE_KEYS)
MAX_IMAGE_PIXELS = 50_000_000
PathSpec = str | os.PathLike | Sequence[str]
# (where, image path or bytes, record): the record maps EvalData list fields to this row's value,
# or is a skip kind (str) when the row is unusable.
Row = tuple[str, str | bytes | None, dict | str]


class EvalDataError(ValueError):
    """Evaluation data that cannot be used; the message names the file (and line)."""


@dataclass
class EvalData:
    """One evaluation set: N images (path ``str`` or encoded ``bytes``) plus per-task fields."""

    images: list
    labels: list[int] | None = None  # zeroshot_classification: class index per image
    multilabels: list | None = None  # zeroshot_classification of a multilabel set: a C-vector per image (0/1)
    group_metadata: list | None = None  # DataComp's per-image metadata row (vlp.eval.datacomp_metrics)
    group_metrics: str = ""  # the DataComp evaluator group_metadata is for ('' = none)
    classnames: list[str] | None = None  # zeroshot_classification
    templates: list | None = None  # zeroshot_classification: --templates, else found beside the data, else None
    captions: list[str] | None = None  # retrieval, captioning: all captions flattened; counting: one per image
    text_to_image: list[int] | None = None  # retrieval, captioning: image index of each caption
    positives: list[str] | None = None  # compositional
    negatives: list[list[str]] | None = None  # compositional
    types: list[str | None] | None = None  # compositional
    counts: list[int] | None = None  # counting
    split: list[str] | None = None  # linear_probe: "train" or "test" per image
    skipped: dict[str, int] = field(default_factory=dict)
    name: str = ""  # dataset name for the JSON output (folder or file stem)
    spool: object = None  # vlp.eval.tar_index.Spool holding remote shards' images: kept while images are read


class ImageList(Dataset):
    """``images`` (paths or bytes) -> items ``(i, preprocess(image), "")`` or ``(i, None, kind)``,
    kind: missing_image, unreadable_image, corrupt_image, animated_image or image_too_large
    (> ``max_pixels``). Images become RGB under ``policy`` (EXIF orientation, alpha, bit depth:
    :mod:`vlp.data.images`), as in training. Failures travel in the items, not in a counter here,
    because DataLoader workers hold copies.
    """

    def __init__(
        self,
        images: Sequence[str | bytes],
        preprocess: Callable,
        max_pixels: int = MAX_IMAGE_PIXELS,
        policy: ImagePolicy | None = None,
    ):
        self.images, self.preprocess, self.max_pixels = images, preprocess, max_pixels
        self.policy = policy or ImagePolicy()

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor | None, str]:
        data = self.images[i]
        if isinstance(data, TarSlice):
            try:
                data = data.read()
            except OSError:
                return i, None, "unreadable_image"
        if not isinstance(data, (bytes, bytearray)):
            try:
                data = Path(data).read_bytes()
            except FileNotFoundError:
                return i, None, "missing_image"
            except OSError:  # a directory, no permission, an I/O error
                return i, None, "unreadable_image"
        image, kind = decode_image(bytes(data), self.max_pixels, policy=self.policy)
        return (i, None, kind) if image is None else (i, self.preprocess(image), "")

    @staticmethod
    def collate(batch: list) -> tuple[torch.Tensor, torch.Tensor, list[tuple[int, str]]]:
        """Items -> ``(indices LongTensor[B], images [B, 3, H, W], failed [(index, kind)])``; B
        counts the decoded images only (when none, ``images`` is ``torch.empty(0)``)."""
        good = [(i, x) for i, x, _ in batch if x is not None]
        indices = torch.tensor([i for i, _ in good], dtype=torch.long)
        images = torch.stack([x for _, x in good]) if good else torch.empty(0)
        return indices, images, [(i, kind) for i, x, kind in batch if x is None]


def _read_lines(path: Path, what: str) -> list[tuple[int, str]]:
    """(line number, stripped text) of the non-blank lines; EvalDataError if none, no file or a
    byte that is not UTF-8 (naming the line; :mod:`vlp.data.textfiles`)."""
    try:
        rows = [(n, s) for n, line in enumerate(text_lines(path, error=EvalDataError), 1) if (s := line.strip())]
    except OSError as e:
        raise EvalDataError(f"cannot read the {what} file {path}: {e.strerror or e}") from None
    if not rows:
        raise EvalDataError(f"{path}: no {what} in the file")
    return rows


def _named_list(spec, names: tuple[str, ...]):
    """A config list holding one entry that names a list (``[imagenet]``, a file) as that name: YAML's
    ``eval.classnames: [imagenet]`` means what ``--classnames imagenet`` means."""
    one = isinstance(spec, (list, tuple)) and len(spec) == 1 and isinstance(spec[0], str)
    return spec[0] if one and (spec[0] in names or Path(spec[0]).is_file()) else spec


def load_classnames(spec: str | os.PathLike | Sequence[str]) -> list[str]:
    """Class names from a list, a file (one per line) or ``"imagenet"`` (open_clip's 1000).
    Raises EvalDataError for a missing or empty file or an empty list."""
    spec = _named_list(spec, ("imagenet",))
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise EvalDataError("classnames is an empty list")
        return [str(name) for name in spec]
    if str(spec) == "imagenet":
        from open_clip import zero_shot_metadata

        return list(zero_shot_metadata.IMAGENET_CLASSNAMES)
    return [line for _, line in _read_lines(Path(spec), "class names")]


def load_templates(spec: str | os.PathLike | Sequence) -> list:
    """Templates from a file (one per line), ``"imagenet"`` (open_clip's 80 OpenAI templates,
    callables), ``"imagenet-simple"`` (open_clip's 7) or a list of str/callables. Raises
    EvalDataError: missing/empty file or list, a template without ``{c}`` or with other fields
    (naming the file and line, or the list index)."""
    spec = _named_list(spec, ("imagenet", "imagenet-simple"))
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise EvalDataError("templates is an empty list")
        rows = [(f"templates[{i}]", template) for i, template in enumerate(spec)]
    elif str(spec) in ("imagenet", "imagenet-simple"):
        from open_clip import zero_shot_metadata as meta

        return list(meta.OPENAI_IMAGENET_TEMPLATES if str(spec) == "imagenet" else meta.SIMPLE_IMAGENET_TEMPLATES)
    else:
        rows = [(f"{spec}:{n}", template) for n, template in _read_lines(Path(spec), "templates")]
    for where, template in (row for row in rows if not callable(row[1])):
        if not isinstance(template, str) or "{c}" not in template:
            raise EvalDataError(f"{where}: template {template!r} has no '{{c}}' placeholder for the class name")
        try:
            template.format(c="x")
        except (KeyError, IndexError, ValueError) as e:
            raise EvalDataError(f"{where}: template {template!r} has fields other than '{{c}}' ({e!r})") from None
    return [template for _, template in rows]


def collect(source, name: str, rows: Iterable[Row], skips: SkipCounter | None = None, **extra) -> EvalData:
    """Rows -> EvalData named ``name``: a record's values are appended to the EvalData fields of their
    keys (a list under ``captions`` is flattened, with ``text_to_image``); a str record, or an image
    path that is no file (``missing_image``), is counted in ``skips``; ``extra`` are fields of the
    whole set. Raises EvalDataError naming ``source`` when no row is usable."""
    skips, lists, images = skips or SkipCounter(), {}, []
    for where, image, record in rows:
        if not isinstance(record, str) and isinstance(image, str) and not os.path.isfile(image):
            record = "missing_image"
        if isinstance(record, str):
            skips.add(record, where, image if isinstance(image, str) else "")
            continue
        for key, value in record.items():
            if key == "captions" and isinstance(value, list):
                lists.setdefault("text_to_image", []).extend([len(images)] * len(value))
                lists.setdefault(key, []).extend(value)
            else:
                lists.setdefault(key, []).append(value)
        images.append(image)
    if not images:
        raise EvalDataError(f"{source}: no usable samples; skipped: {dict(skips.counts) or 'none'}")
    return EvalData(images=images, name=name, skipped=dict(skips.counts), **extra, **lists)


def _shard_urls(path: PathSpec) -> list[str] | None:
    """Expanded shard urls when ``path`` is shard patterns (a list, ``.tar`` or ``{..}``), else None."""
    if not (isinstance(path, (list, tuple)) or str(path).endswith(".tar") or "{" in str(path)):
        return None
    try:
        return expand_urls(list(path) if isinstance(path, (list, tuple)) else [str(path)], "eval data")
    except DataConfigError as e:
        raise EvalDataError(str(e)) from None


def spool_for(urls: list[str]) -> Spool | None:
    """A Spool for the remote shards among ``urls`` (None when all are local files)."""
    return None if all(is_local(url) for url in urls) else Spool()


def _shard_rows(
    urls: list[str], skips: SkipCounter, convert: Callable[[dict, dict, str], dict | str], spool: Spool | None = None
) -> Iterator[Row]:
    """One row per shard sample; ``convert(raw sample, json metadata, where)`` makes its record.
    Images are TarSlices: of a local shard, or of ``spool`` for a remote one (streamed, never held)."""
    # the training stream's reader: the same truncated/unreadable-shard detection and counting
    from vlp.data.stream import _shard_samples

    for url in urls:
        if is_local(url):
            samples = _indexed(url, skips)
        elif spool is None:
            raise ValueError(f"{url}: a remote shard is read through a Spool (spool_for(urls))")
        else:
            samples = spool.samples(_shard_samples(url, skips), IMAGE_KEYS)
        for raw in samples:
            where = f"{url}#{raw.get('__key__', '?')}"
            try:
                meta = json.loads(raw["json"]) if "json" in raw else {}
            except ValueError:
                meta = None
            if not isinstance(meta, dict):
                skips.add("bad_json", where)
                meta = {}
            image = next((raw[k] for k in IMAGE_KEYS if k in raw), None)
            yield where, image, convert(raw, meta, where) if image is not None else "missing_image"


def _indexed(url: str, skips: SkipCounter) -> Iterator[dict]:
    """A local shard's samples with their images as TarSlice objects (read when encoded)."""
    import tarfile

    try:
        yield from indexed_samples(url, IMAGE_KEYS)
    except (tarfile.TarError, OSError, EOFError) as e:
        skips.add("shard_error", url, repr(e))


def _classification_shards(path: PathSpec, urls: list[str], classnames, templates) -> EvalData:
    """Shards of ``path`` (expanded to ``urls``) -> EvalData; see :func:`load_classification`."""
    info_file = Path(urls[0]).parent / "_info.json"  # written by `vlp shards`
    text = read_text(info_file, error=EvalDataError) if info_file.is_file() else "{}"
    try:
        info = json.loads(text)
    except ValueError:
        raise EvalDataError(f"{info_file}: malformed JSON") from None
    classnames, templates = classnames or info.get("classnames"), templates or info.get("templates")
    if not classnames:
        raise EvalDataError(f"{urls[0]}: class names needed: pass classnames or add 'classnames' to {info_file}")
    names = load_classnames(classnames)

    def label(raw: dict, meta: dict, where: str) -> dict | str:
        try:  # int() parses bytes such as b"3\n" (a cls member); json gives an int
            value = int(raw["cls"]) if "cls" in raw else meta.get("cls")
        except ValueError:
            value = None
        if type(value) is not int:  # type(): a bool is no label
            return "missing_label"
        if not 0 <= value < len(names):
            raise EvalDataError(f"{where}: label {value} outside the {len(names)} class names")
        return {"labels": value}

    templates = load_templates(templates) if templates else None
    skips, spool = SkipCounter(), spool_for(urls)
    rows = _shard_rows(urls, skips, label, spool)
    return collect(path, Path(urls[0]).parent.name, rows, skips, classnames=names, templates=templates, spool=spool)


def _classification_folder(root: Path, classnames, templates) -> EvalData:
    """ImageFolder at ``root`` -> EvalData; see :func:`load_classification`."""
    if not root.is_dir():
        raise EvalDataError(f"{root}: not found (expected an image folder <root>/<class>/*.jpg or .tar shards)")
    # every sub-folder is a class, even an empty one: a zero-shot classifier still scores it
    folders = sorted((p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")), key=lambda p: p.name)
    if not folders:
        raise EvalDataError(f"{root}: no class sub-folders (expected <root>/<class>/*.jpg)")
    if classnames is None and (root / "classnames.txt").is_file():
        classnames = root / "classnames.txt"
    names = load_classnames(classnames) if classnames is not None else [p.name.replace("_", " ") for p in folders]
    if len(names) != len(folders):
        source = classnames if isinstance(classnames, (str, os.PathLike)) else "the classnames list"
        raise EvalDataError(f"{root}: {len(folders)} class folders but {len(names)} class names in {source}")
    if templates is None and (root / "templates.txt").is_file():
        templates = root / "templates.txt"
    files = [(label, f) for label, folder in enumerate(folders) for f in sorted(folder.rglob("*"))]
    rows = [(str(f), os.path.abspath(f), {"labels": k}) for k, f in files if f.suffix.lower() in IMAGE_EXTENSIONS]
    templates = load_templates(templates) if templates is not None else None
    return collect(root, root.name, rows, classnames=names, templates=templates)


def load_classification(path: PathSpec, classnames=None, templates=None) -> EvalData:
    """ImageFolder or WebDataset shards -> images, labels, classnames (and templates if found).

    Folder: classes are the sub-folders sorted by name, named by ``classnames`` (see
    :func:`load_classnames`), else ``root/classnames.txt``, else folder names with ``_`` -> space;
    templates (:func:`load_templates`) from ``templates`` or ``root/templates.txt``. Shards: both
    from the arguments or ``_info.json``; unlabelled samples are counted (``missing_label``).
    Raises EvalDataError: path/shard not found, no class folder or usable image, class-name count
    not matching the folders, a label outside the class names, bad class names or templates.
    """
    if (urls := _shard_urls(path)) is not None:
        return _classification_shards(path, urls, classnames, templates)
    return _classification_folder(Path(path), classnames, templates)


def jsonl_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """("file:line", object) per non-blank line; EvalDataError on a missing file, bad JSON or a
    byte that is not UTF-8."""
    if not path.is_file():
        raise EvalDataError(f"{path}: not found")
    for lineno, line in enumerate(text_lines(path, error=EvalDataError), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError(f"expected a JSON object, got {type(row).__name__}")
        except ValueError as e:
            raise EvalDataError(f"{path}:{lineno}: malformed JSON line: {e}") from None
        yield f"{path}:{lineno}", row


def get_field(row: dict, key: str, kind: type, where: str, alt: str = ""):
    """``row[key]`` (else ``[row[alt]]``, a str) checked to be ``kind`` (a list: of str).
    Raises EvalDataError naming ``where`` if it is missing or of another type."""
    if alt and key not in row:
        return [get_field(row, alt, str, where)]
    value = row.get(key)
    if not isinstance(value, kind) or (kind is list and not all(isinstance(v, str) for v in value)):
        wanted = "list of str" if kind is list else kind.__name__
        raise EvalDataError(f"{where}: field {key!r} must be a {wanted}, got {value!r:.80}")
    return value


def image_path(row: dict, key: str, root: Path, where: str) -> str:
    """Absolute path of the row's image; a relative path is taken from ``root``."""
    path = Path(get_field(row, key, str, where)).expanduser()
    return os.path.abspath(path if path.is_absolute() else root / path)


def _captions(captions: list[str], problem: str = "empty_caption") -> dict | str:
    captions = [c.strip() for c in captions if c and c.strip()]
    return {"captions": captions} if captions else problem


def _shard_captions(raw: dict, meta: dict, where: str) -> dict | str:
    """A sample's json ``captions`` list if it has one, else its ``txt``; or the skip kind."""
    captions = meta.get("captions")
    if isinstance(captions, list) and all(isinstance(c, str) for c in captions):
        return _captions(captions)
    caption, problem = decode_caption(raw.get("txt"))
    return _captions([caption], problem)


def load_retrieval(path: PathSpec) -> EvalData:
    """JSONL (images relative to its folder) or shards -> images, flat captions, text_to_image.
    Skipped and counted: a missing image file (``missing_image``; its captions go too), blank
    captions only (``empty_caption``), for shards also ``missing_caption``/``bad_caption_encoding``.
    Raises EvalDataError: file not found, malformed line, ``image``/``captions`` of the wrong
    type, no usable row.
    """
    if (urls := _shard_urls(path)) is not None:
        skips, spool = SkipCounter(), spool_for(urls)
        rows = _shard_rows(urls, skips, _shard_captions, spool)
        return collect(path, Path(urls[0]).parent.name, rows, skips, spool=spool)
    path = Path(path)
    rows = (
        (
            where,
            image_path(row, "image", path.parent, where),
            _captions(get_field(row, "captions", list, where, "caption")),
        )
        for where, row in jsonl_rows(path)
    )
    return collect(path, path.stem, rows)
