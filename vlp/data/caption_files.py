"""`vlp shards --captions`: pack the (image, caption) rows of a JSONL/CSV/TSV file into shards.

Messy input is converted, or skipped and counted by kind (one warning names the first rows), or
stops the job before anything is written with one line naming the file, the line and the fix:

- **Encodings**: the file is read as ``encoding`` (UTF-8 by default); a byte-order mark decides
  (UTF-8, UTF-16, UTF-32), and a byte that does not decode stops the job naming the line and the
  ``--encoding`` to pass (:mod:`vlp.data.textfiles`). CRLF and CR line ends work.
- **More cells than the header** in a CSV/TSV row (an unquoted comma in a caption): skipped as
  ``extra_fields``, or with ``extra_fields="join"`` joined back onto the caption with the
  delimiter, which needs the caption to be the header's last column. Empty extra cells (a trailing
  delimiter) hold nothing and are ignored.
- **Quotes**: a CSV/TSV field that opens with ``"`` is a quoted field (inner quotes doubled), as
  in every CSV reader, and malformed quoting (text after a closing quote, a quote never closed)
  stops the job naming the line, instead of silently merging the rows that follow into one caption.
  ``quoting="none"`` reads files that use no quoting at all (many TSV caption lists): quotes are
  then part of the text.
- **Repeated rows**: a row with the image (resolved path) and caption of an earlier row is skipped
  as ``duplicate_row``; the same image with another caption is kept (COCO has five per image).
- **Images** get the decision the training stream and the evaluation loaders make
  (:func:`vlp.data.images.inspect_image`): ``corrupt_image``, ``image_too_large`` and
  ``animated_image`` are skipped. JPEG, PNG and WebP bytes are copied unchanged; another still
  format the stream does not read (BMP, GIF, TIFF, ...) is converted to PNG without loss (mode and
  EXIF orientation kept, so the picture is turned upright at read time like any other).
- **Captions longer than the model's context** (``tokenizer``, the one of the architecture
  ``model`` names; `vlp shards` passes ViT-B-32's, 77 tokens, by default) are counted, as
  ``long_captions``: training cuts them.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from vlp.data.images import ImagePolicy, inspect_image, to_rgb
from vlp.data.shards import INFO_FILE, ShardError, finalize_shards, write_samples
from vlp.data.textfiles import check_encoding, text_lines

logger = logging.getLogger(__name__)

SKIP_KINDS = (
    "missing_image",  # no image field, or no such file
    "empty_caption",
    "bad_caption_encoding",  # a JSON caption with a lone surrogate escape ("\ud800"), which UTF-8 cannot hold
    "unreadable_image",  # the file cannot be read (permissions, I/O error)
    "corrupt_image",  # zero bytes, not an image, truncated
    "image_too_large",  # more pixels than ImagePolicy.max_pixels (read from the header)
    "animated_image",  # animated GIF/WebP/PNG, multi-page TIFF: no frame stands for the clip
    "outside_root",
    "extra_fields",  # CSV/TSV row with more cells than the header (extra_fields="skip")
    "duplicate_row",  # the image and caption of an earlier row
)
# PIL format name -> extension stored in the shard; these bytes are copied, not re-encoded.
IMAGE_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}
PNG_MODES = ("1", "L", "LA", "P", "RGB", "RGBA", "I;16")  # kept as they are when converting to PNG
_ALPHA_MODES = ("PA", "La", "RGBa")  # alpha PNG cannot store as it is: RGBA keeps it
CAPTION_EXTENSIONS = (".jsonl", ".json", ".csv", ".tsv")
EXTRA_FIELDS = ("skip", "join")
QUOTING = ("csv", "none")
_IMAGE_NAME = re.compile(r"\.(jpe?g|png|webp|gif|bmp|tiff?|avif)$", re.IGNORECASE)
DEFAULT_MODEL = "ViT-B-32"
MAX_SKIP_WARNINGS = 5
_ORIENTATION = 0x0112


@dataclass(frozen=True)
class CaptionsFile:
    """A captions file and how to read it (see :func:`write_caption_shards`)."""

    path: Path
    image_key: str = "image"
    caption_key: str = "caption"
    encoding: str = "utf-8"
    extra_fields: str = "skip"
    quoting: str = "csv"  # "none": quotes are text, not CSV quoting

    def lines(self, newline: str | None = None) -> Iterator[str]:
        """The file's decoded lines; ShardError naming the line and ``--encoding`` for a bad byte."""
        return text_lines(self.path, self.encoding, newline=newline, option="--encoding", error=ShardError)


def caption_rows(source: CaptionsFile) -> Iterator[tuple[int, dict, str]]:
    """``(line number, row, problem)`` per row of a .jsonl/.json/.csv/.tsv file; ``problem`` is ""
    or ``extra_fields``. CSV/TSV header names are stripped of surrounding spaces.

    Raises:
        ShardError: the file is missing or of an unknown extension; a byte does not decode; a
            CSV/TSV header lacks a column (or with extra_fields="join" does not end with the
            caption column); a malformed CSV line; a JSON line that is malformed or no object.
    """
    if not source.path.is_file():
        raise ShardError(f"captions file not found: {source.path}")
    ext = source.path.suffix.lower()
    if ext not in CAPTION_EXTENSIONS:
        raise ShardError(f"{source.path}: unknown captions file extension {ext!r}; expected {CAPTION_EXTENSIONS}")
    if ext in (".csv", ".tsv"):
        return _csv_rows(source, "\t" if ext == ".tsv" else ",")
    return _jsonl_rows(source)


def _csv_rows(source: CaptionsFile, delimiter: str) -> Iterator[tuple[int, dict, str]]:
    quoting = csv.QUOTE_NONE if source.quoting == "none" else csv.QUOTE_MINIMAL
    # strict: a quote closed in mid-field or never closed is an error, not rows merged into one caption
    reader = csv.reader(source.lines(newline=""), delimiter=delimiter, quoting=quoting, strict=True)
    try:
        header = [name.strip() for name in next(reader, [])]
        _check_header(source, header)
        end = reader.line_num
        for cells in reader:
            start, end = end + 1, reader.line_num
            if not cells:  # a blank line
                continue
            if end > start:
                _check_swallowed(source, cells, delimiter, header, start, end)
            # a short row's missing cells are None, as csv.DictReader gives them
            row = dict(zip(header, cells)) | dict.fromkeys(header[len(cells) :])
            extra, problem = cells[len(header) :], ""
            if any(cell.strip() for cell in extra):
                if source.extra_fields == "join":
                    row[source.caption_key] = delimiter.join([row[source.caption_key], *extra])
                else:
                    problem = "extra_fields"
            yield reader.line_num, row, problem
    except csv.Error as e:
        raise ShardError(
            f"{source.path}:{reader.line_num}: malformed CSV ({e}): quote a field that holds the delimiter, a "
            'quote or a line break ("...", inner quotes doubled), or pass --quoting none if the file uses no quoting'
        ) from None


def _check_swallowed(source: CaptionsFile, cells: list[str], delimiter: str, header: list[str], start: int, end: int):
    """A quoted field over several lines is legal CSV, but when a line inside it reads as a row (as
    many cells as the header, an image file name in the image column), a stray quote has swallowed
    the rows that follow: stop instead of losing them."""
    where = header.index(source.image_key)

    def row_like(line: str) -> bool:
        parts = line.split(delimiter)
        return len(parts) >= len(header) and _IMAGE_NAME.search(parts[where].strip()) is not None

    for cell in cells:
        if any(row_like(line) for line in cell.splitlines()[1:]):
            raise ShardError(
                f"{source.path}:{start}-{end}: a quoted field runs over {end - start + 1} lines and holds what look "
                "like rows (a quote opened and closed on different lines); quote that caption properly, or pass "
                "--quoting none if the file uses no quoting"
            )


def _check_header(source: CaptionsFile, header: list[str]) -> None:
    for column in (source.image_key, source.caption_key):
        if column not in header:
            raise ShardError(f"{source.path}: column {column!r} not in the header; columns found: {header}")
    if source.extra_fields == "join" and header[-1] != source.caption_key:
        raise ShardError(
            f"{source.path}: --extra-fields join appends a row's extra cells to its caption, so the caption "
            f"column {source.caption_key!r} must be the header's last, not {header[-1]!r}; move that column to "
            "the end, or quote the captions that hold the delimiter"
        )


def _json_array_rows(source: CaptionsFile) -> Iterator[tuple[int, dict, str]] | None:
    """The rows of a ``.json`` file holding one array of objects (``[{...}, {...}]``), numbered from
    1 in place of lines; None for a file that is not such an array (read as JSON lines)."""
    if source.path.suffix.lower() != ".json":
        return None
    text = "".join(source.lines())
    if not text.lstrip().startswith("["):
        return None
    try:
        items = json.loads(text)
    except json.JSONDecodeError as e:
        raise ShardError(f"{source.path}:{e.lineno}: malformed JSON: {e.msg} (column {e.colno})") from None
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise ShardError(f"{source.path}: item {i} of the array is a {type(item).__name__}, not a JSON object")
    return ((i, item, "") for i, item in enumerate(items, start=1))


def _jsonl_rows(source: CaptionsFile) -> Iterator[tuple[int, dict, str]]:
    array = _json_array_rows(source)
    if array is not None:
        yield from array
        return
    for lineno, line in enumerate(source.lines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as e:
            raise ShardError(f"{source.path}:{lineno}: malformed JSON: {e.msg}") from None
        if not isinstance(item, dict):
            raise ShardError(f"{source.path}:{lineno}: expected a JSON object, got {type(item).__name__}")
        yield lineno, item, ""


def shard_image(data: bytes, max_pixels: int = ImagePolicy.max_pixels) -> tuple[bytes | None, str, str]:
    """An image file's bytes as a shard stores them: ``(bytes, extension, converted from)``.

    JPEG, PNG and WebP bytes come back unchanged (converted from ""); another still format
    (BMP, GIF, TIFF, ...) is re-encoded as PNG without loss (converted from its PIL format name).
    A problem found by :func:`vlp.data.images.inspect_image` gives ``(None, kind, "")``.
    """
    image, problem = inspect_image(data, max_pixels)
    if image is None:
        return None, problem, ""
    if image.format in IMAGE_FORMATS:
        return data, IMAGE_FORMATS[image.format], ""
    return _png(image), "png", image.format or "unknown"


def _png(image: Image.Image) -> bytes:
    """``image`` as PNG: its mode kept where PNG holds it, alpha kept, and its EXIF block (or its
    orientation tag) carried over, so readers turn it upright as they would the original."""
    exif = image.info.get("exif") or _orientation_exif(image)
    if image.mode in _ALPHA_MODES:
        image = image.convert("RGBA")
    elif image.mode not in PNG_MODES:
        # CMYK, YCbCr, 32-bit or float greyscale: the RGB the stream would make; orientation left to read time
        image = to_rgb(image, ImagePolicy(exif_transpose=False))
    buf = io.BytesIO()
    image.save(buf, format="PNG", **({"exif": exif} if exif else {}))
    return buf.getvalue()


def _orientation_exif(image: Image.Image) -> Image.Exif | None:
    """A minimal EXIF block holding ``image``'s orientation (TIFF keeps it among its own tags)."""
    try:
        orientation = image.getexif().get(_ORIENTATION)
    except Exception:  # noqa: BLE001 - a damaged block: readers keep such pixels as stored, so do we
        return None
    if orientation not in range(2, 9):
        return None
    exif = Image.Exif()
    exif[_ORIENTATION] = orientation
    return exif


def token_count(tokenizer, text: str) -> int:
    """Tokens of ``text`` before truncation, start and end tokens included, for open_clip's
    SimpleTokenizer and HFTokenizer (their calls truncate to the context without a word)."""
    if hasattr(tokenizer, "sot_token_id"):  # SimpleTokenizer: BPE tokens between start and end
        return len(tokenizer.encode(text)) + 2
    clean = getattr(tokenizer, "clean_fn", str)
    if getattr(tokenizer, "tokenizer_mode", "") == "clips":  # start, end and a class token added
        return len(tokenizer.tokenizer(clean(text), add_special_tokens=False)["input_ids"]) + 3
    return len(tokenizer.tokenizer(clean(text))["input_ids"])


def _json_bytes(fields: dict) -> bytes:
    try:
        return json.dumps(fields, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate escape: only the escaped form is valid UTF-8
        return json.dumps(fields).encode("utf-8")


class _Packer:
    """Rows -> samples; counts skips (kind, first examples), formats and long captions."""

    def __init__(self, source: CaptionsFile, root: Path, allow_outside_root: bool, tokenizer):
        self.source, self.root, self.allow_outside_root, self.tokenizer = source, root, allow_outside_root, tokenizer
        self.seen: set[bytes] = set()  # 16-byte digests of (image path, caption)
        self.skipped: Counter = Counter()
        self.examples: list[str] = []
        self.formats: Counter = Counter()
        self.long_captions = 0

    def samples(self, rows: Iterator[tuple[int, dict, str]]) -> Iterator[dict]:
        for key, (lineno, row, problem) in enumerate(rows):
            sample, kind = (None, problem) if problem else self._sample(key, row)
            if sample is None:
                self.skipped[kind] += 1
                if len(self.examples) < MAX_SKIP_WARNINGS:
                    self.examples.append(f"line {lineno}: {kind} ({row.get(self.source.image_key)!r})")
                continue
            yield sample

    def _sample(self, key: int, row: dict) -> tuple[dict | None, str]:
        """Encoded sample for one row, or (None, skip kind)."""
        image_key, caption_key = self.source.image_key, self.source.caption_key
        caption = row.get(caption_key)
        caption = caption.strip() if isinstance(caption, str) else ""
        if not caption:
            return None, "empty_caption"
        try:
            txt = caption.encode("utf-8")
        except UnicodeEncodeError:
            return None, "bad_caption_encoding"
        path, kind = _resolve_image(row.get(image_key), self.root, self.allow_outside_root)
        if path is None:
            return None, kind
        digest = hashlib.blake2b(os.fsencode(path) + b"\0" + txt, digest_size=16).digest()
        if digest in self.seen:
            return None, "duplicate_row"
        self.seen.add(digest)
        try:
            data = path.read_bytes()
        except OSError:
            return None, "unreadable_image"
        data, ext, converted_from = shard_image(data)
        if data is None:
            return None, ext
        self.formats[f"{ext} (converted from {converted_from})" if converted_from else ext] += 1
        if self.tokenizer is not None and token_count(self.tokenizer, caption) > self.tokenizer.context_length:
            self.long_captions += 1
        extra = {k: v for k, v in row.items() if k not in (image_key, caption_key)}
        return {"__key__": f"{key:09d}", ext: data, "txt": txt, "json": _json_bytes(extra)}, ""

    def report(self, total: int) -> dict[str, int]:
        """Log one warning naming the first skipped rows; return {kind: count} for every kind."""
        if self.skipped:
            logger.warning(
                "skipped %d of %d rows of %s (%s); first: %s",
                sum(self.skipped.values()), total, self.source.path, dict(self.skipped), "; ".join(self.examples),
            )  # fmt: skip
        return {kind: self.skipped.get(kind, 0) for kind in SKIP_KINDS}


def _resolve_image(value, root: Path, allow_outside_root: bool) -> tuple[Path | None, str]:
    """Resolve an image path against ``root``; returns (path, "") or (None, skip kind)."""
    if not isinstance(value, str) or not value.strip():
        return None, "missing_image"
    path = Path(value.strip()).expanduser()
    # resolve() follows symlinks, so a link inside root that points outside is caught too.
    path = (path if path.is_absolute() else root / path).resolve()
    if not allow_outside_root and not path.is_relative_to(root):
        return None, "outside_root"
    if not path.is_file():
        return None, "missing_image"
    return path, ""


def write_caption_shards(
    captions_file: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    images_root: str | os.PathLike | None = None,
    image_key: str = "image",
    caption_key: str = "caption",
    encoding: str = "utf-8",
    extra_fields: str = "skip",
    quoting: str = "csv",
    tokenizer=None,
    model: str = DEFAULT_MODEL,
    max_samples_per_shard: int = 1000,
    prefix: str = "data",
    progress: bool = True,
    allow_outside_root: bool = False,
) -> dict:
    """Pack (image, caption) rows of a JSONL/CSV/TSV file into shards (the module docstring says
    what happens to messy input).

    Image paths are relative to ``images_root`` (default: the captions file's folder) or
    absolute. A sample's key is its 0-based row number; its ``json`` holds the row's other
    fields. ``tokenizer`` (open_clip's, of the architecture ``model`` names) counts the captions
    longer than its context; without one they are not counted (``long_captions`` None).

    Returns:
        The _info.json dict: num_samples, num_shards, shards, source="captions",
        skipped={kind: count} (every kind of SKIP_KINDS), num_rows, formats={ext or
        "png (converted from BMP)": count}, converted (images re-encoded as PNG), long_captions,
        model, context_length, captions_file, images_root, image_key, caption_key, encoding,
        extra_fields, max_samples_per_shard, prefix.

    Raises:
        ShardError: an unknown encoding, extra_fields mode or model; as :func:`caption_rows`
            (before anything is written); no usable row at all (after the pass).
        OSError: the output folder cannot be written.
    """
    if extra_fields not in EXTRA_FIELDS:
        raise ShardError(f"extra_fields must be one of {EXTRA_FIELDS}, got {extra_fields!r}")
    if quoting not in QUOTING:
        raise ShardError(f"quoting must be one of {QUOTING}, got {quoting!r}")
    try:
        check_encoding(encoding)
    except ValueError as e:
        raise ShardError(str(e)) from None
    path = Path(captions_file).expanduser().resolve()
    source = CaptionsFile(path, image_key, caption_key, encoding, extra_fields, quoting)
    root = Path(images_root).expanduser().resolve() if images_root is not None else path.parent
    # A first pass validates the whole file (fatal errors stop before anything is written)
    # and gives the progress bar its total.
    total = sum(1 for _ in caption_rows(source))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / INFO_FILE).unlink(missing_ok=True)
    packer = _Packer(source, root, allow_outside_root, tokenizer)
    rows = tqdm(caption_rows(source), total=total, disable=None if progress else True, desc="pack", unit="row")
    sizes = write_samples(packer.samples(rows), out, prefix, max_samples_per_shard, int(time.time()))
    skipped = packer.report(total)
    if not sizes:
        raise ShardError(f"{path}: no usable rows out of {total}; skipped: {skipped}")
    info = {
        "source": "captions",
        "skipped": skipped,
        "num_rows": total,
        "formats": dict(packer.formats),
        "converted": sum(n for fmt, n in packer.formats.items() if "converted" in fmt),
        "long_captions": packer.long_captions if tokenizer is not None else None,
        "model": model,
        "context_length": int(tokenizer.context_length) if tokenizer is not None else None,
        "captions_file": str(path),
        "images_root": str(root),
        "image_key": image_key,
        "caption_key": caption_key,
        "encoding": encoding,
        "extra_fields": extra_fields,
        "quoting": quoting,
        "max_samples_per_shard": int(max_samples_per_shard),
        "prefix": prefix,
    }
    return finalize_shards(out, prefix, sizes, info)


def report_lines(info: dict) -> list[str]:
    """What `vlp shards --captions` prints after writing: the skips, conversions and long captions
    of :func:`write_caption_shards`'s info, each line with what to do about it."""
    lines = []
    skipped = {k: v for k, v in info["skipped"].items() if v}
    if skipped:
        lines.append(f"skipped rows: {skipped} (the warning above names the first)")
    if skipped.get("extra_fields"):
        lines.append(
            f"{_count(skipped['extra_fields'], 'row has', 'rows have')} more cells than the header (an unquoted "
            "delimiter in the caption?): quote those captions, or pass --extra-fields join to keep them whole"
        )
    if info["converted"]:
        sources = {fmt.split()[-1].rstrip(")"): n for fmt, n in info["formats"].items() if "converted" in fmt}
        images = _count(info["converted"], "image", "images")
        lines.append(f"converted {images} to PNG, as the stream reads only JPEG, PNG and WebP: {sources}")
    if info["long_captions"]:
        lines.append(
            f"{_count(info['long_captions'], 'caption is', 'captions are')} longer than {info['model']}'s "
            f"{info['context_length']}-token context and will be cut in training (pass --model to check another "
            "architecture)"
        )
    return lines


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"
