"""Text files that people make by hand (captions lists, class names, templates, eval JSONL), read in a
named encoding with one-line errors.

- A byte-order mark decides the encoding, whatever was asked for: UTF-8's is skipped, and a UTF-16
  or UTF-32 one (Excel's "Unicode text", Notepad's "Unicode") switches to that encoding. A BOM
  cannot be mistaken for text, so this never misreads a file.
- A byte the encoding cannot decode raises an error naming ``file:line``, the byte and its column,
  and the fix: the encoding option to pass (``option``, e.g. ``--encoding``) or saving as UTF-8.
- A NUL character (UTF-16 without a BOM read as UTF-8 decodes to text full of them) raises the same
  way, suggesting UTF-16, instead of surfacing later as a puzzling parse error.

Files are decoded by ``open()`` at C speed; only after a failure does :func:`decode_error_at` read
the file again, in binary chunks through an incremental decoder, to find the line and column.
"""

from __future__ import annotations

import codecs
import os
from collections.abc import Iterator

# Longest first: UTF-32-LE's mark starts with UTF-16-LE's.
_BOMS = (
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class TextFileError(ValueError):
    """A text file that does not decode; the message names the file, the line and the fix."""


def check_encoding(encoding: str) -> str:
    """``encoding`` if Python knows it as a text encoding; else ValueError naming a few."""
    try:
        info = codecs.lookup(encoding)
    except LookupError:
        info = None
    if info is None or not getattr(info, "_is_text_encoding", True):
        raise ValueError(f"unknown text encoding {encoding!r}; e.g. utf-8, cp1252, latin-1, utf-16, shift_jis")
    return encoding


def file_encoding(path: str | os.PathLike, encoding: str = "utf-8") -> str:
    """The codec to read ``path`` with: its byte-order mark's, else ``encoding`` (UTF-8 as
    ``utf-8-sig``, which drops a mark). Raises OSError if the file cannot be read."""
    with open(path, "rb") as f:
        head = f.read(4)
    for bom, codec in _BOMS:
        if head.startswith(bom):
            return codec
    return "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding


def text_lines(
    path: str | os.PathLike,
    encoding: str = "utf-8",
    *,
    newline: str | None = None,
    option: str | None = None,
    error: type[ValueError] = TextFileError,
) -> Iterator[str]:
    """The lines of ``path`` decoded (see the module docstring), split and translated as
    ``open(path, newline=newline)`` does: ``newline=""`` keeps the line ends, for the csv module.

    Raises ``error`` (TextFileError unless given; e.g. the caller's own error type) with one line
    when a byte does not decode or a line holds a NUL; ``option`` is the command-line option that
    sets the encoding, named in the fix. OSError when the file cannot be read, LookupError for an
    unknown encoding (see :func:`check_encoding`).
    """
    codec = file_encoding(path, encoding)
    with open(path, encoding=codec, newline=newline) as f:
        try:
            for lineno, line in enumerate(f, start=1):
                if "\x00" in line:
                    raise error(f"{path}:{lineno}: NUL characters in the text; {_fix('utf-16-le', option)}")
                yield line
        except UnicodeDecodeError:
            raise error(_undecodable(path, encoding, codec, option)) from None


def read_text(
    path: str | os.PathLike,
    encoding: str = "utf-8",
    *,
    option: str | None = None,
    error: type[ValueError] = TextFileError,
) -> str:
    """The whole of ``path`` decoded, line ends kept; raises as :func:`text_lines`."""
    return "".join(text_lines(path, encoding, newline="", option=option, error=error))


def decode_error_at(path: str | os.PathLike, encoding: str) -> tuple[int, int, bytes] | None:
    """Where ``path`` first fails to decode as ``encoding``: ``(line, column, bad bytes)``, line and
    column 1-based, the column counted in characters; None when the whole file decodes. ``\\n``,
    ``\\r\\n`` and a lone ``\\r`` end a line, as for ``open(..., newline="")`` and the csv module.

    Binary chunks go through an incremental decoder, so any codec and any file size work. Raises
    OSError (unreadable file), LookupError (unknown encoding)."""
    decoder = codecs.getincrementaldecoder(encoding)()
    position = (1, 0, False)  # line, characters since its start, last character was a \r
    with open(path, "rb") as f:
        while True:
            chunk = f.read(1 << 16)
            state = decoder.getstate()
            try:
                position = _advance(position, decoder.decode(chunk, final=not chunk))
            except UnicodeDecodeError:
                # the error's offsets count from the decoder's own buffer: redo the chunk byte by byte
                decoder.setstate(state)
                try:
                    for i in range(len(chunk)):
                        position = _advance(position, decoder.decode(chunk[i : i + 1]))
                    decoder.decode(b"", final=not chunk)
                except UnicodeDecodeError as e:
                    return position[0], position[1] + 1, e.object[e.start : e.end]
            if not chunk:
                return None


def _advance(position: tuple[int, int, bool], text: str) -> tuple[int, int, bool]:
    """``(line, column, ends with \\r)`` after reading ``text`` from ``position``."""
    line, column, after_cr = position
    if after_cr and text.startswith("\n"):  # the \r\n pair was counted at its \r
        column, after_cr, text = 0, False, text[1:]
    if not text:
        return line, column, after_cr
    breaks = text.count("\n") + text.count("\r") - text.count("\r\n")
    if breaks:
        column = len(text) - 1 - max(text.rfind("\n"), text.rfind("\r"))
    else:
        column += len(text)
    return line + breaks, column, text.endswith("\r")


def _undecodable(path: str | os.PathLike, encoding: str, codec: str, option: str | None) -> str:
    """One line naming where ``path`` stops decoding as ``codec`` and how to fix it."""
    line, column, bad = decode_error_at(path, codec) or ("?", "?", b"")
    shown = " ".join(f"0x{b:02x}" for b in bad[:4]) or "?"
    name = encoding if codec in (encoding, "utf-8-sig") else f"{codec} (the file starts with its byte-order mark)"
    with open(path, "rb") as f:
        # UTF-16 without a mark read as a one-byte encoding: every other byte of ASCII text is NUL
        looks_utf16 = b"\x00" in f.read(4096)
    if looks_utf16:
        other = "utf-16-le"
    else:
        other = "cp1252" if codecs.lookup(codec).name in ("utf-8", "utf-8-sig") else "utf-8"
    what = "byte" if len(bad) == 1 else "bytes"
    return f"{path}:{line}: not valid {name} ({what} {shown} at column {column}); {_fix(other, option)}"


def _fix(other: str, option: str | None) -> str:
    if option:
        return f"re-run with {option} {other} (or the file's encoding), or save the file as UTF-8"
    return f"save the file as UTF-8 (e.g. iconv -f {other} -t utf-8 FILE > NEW, if it is {other})"
