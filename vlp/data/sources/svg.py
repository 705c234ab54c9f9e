"""SVG metadata (RDF title, keywords, creator) and rasterisation onto a white square.

This module runs in converter worker processes, so it imports only the standard library,
Pillow and (lazily) cairosvg. Every function returns a skip kind instead of raising for a
bad file: one pathological SVG must not stop a conversion of thousands.
"""

from __future__ import annotations

import gc
import io
import re
import signal
import threading
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field

from PIL import Image

NS = {
    "svg": "http://www.w3.org/2000/svg",
    "rdf": "http://www.w3.org/1999/02/22-rdf-syntax-ns#",
    "dc": "http://purl.org/dc/elements/1.1/",
    "cc": "http://web.resource.org/cc/",
    "cc_new": "http://creativecommons.org/ns#",
}
_DC_TITLE = f"{{{NS['dc']}}}title"
_METADATA_END = {f"{{{NS['svg']}}}metadata", f"{{{NS['rdf']}}}RDF"}
# JPEG is kept only when it is at most this fraction of the PNG: clip art is flat colour with
# hard edges, which PNG stores losslessly and compactly and JPEG blurs; gradient-heavy art is
# the exception where PNG gets large.
JPEG_IF_BELOW = 0.5
JPEG_QUALITY = 90
BLANK_LEVEL = 250  # a render whose darkest grey pixel is above this is blank white
CAIROSVG_HINT = "cairosvg is needed to rasterise SVGs: pip install 'vlp[real]' (or pip install cairosvg)"


@dataclass
class SvgMeta:
    """The RDF metadata of one SVG (missing fields are empty)."""

    title: str = ""
    keywords: list[str] = field(default_factory=list)
    creator: str = ""


class RenderTimeout(BaseException):
    """A rasterisation used more CPU time than its limit (a BaseException, so that no
    ``except Exception`` inside cairosvg swallows it)."""


def _text(element) -> str:
    return " ".join((element.text or "").split()) if element is not None else ""


def _work_metadata(rdf) -> SvgMeta:
    """The first ``Work`` (old or new Creative Commons namespace) of an rdf:RDF element."""
    work = rdf.find("cc:Work", NS)
    if work is None:
        work = rdf.find("cc_new:Work", NS)
    if work is None:
        return SvgMeta()
    keywords = [_text(li) for li in work.findall("dc:subject/rdf:Bag/rdf:li", NS)]
    keywords += [_text(s) for s in work.findall("dc:subject", NS) if len(s) == 0]  # a plain-text subject
    creator = work.find("dc:creator", NS)
    creator_name = _text(creator.find(".//dc:title", NS)) if creator is not None else ""
    return SvgMeta(_text(work.find("dc:title", NS)), [k for k in keywords if k], creator_name)


def read_metadata(data: bytes) -> SvgMeta | str:
    """Title, keywords and creator from an SVG's ``metadata/rdf:RDF``; falls back to the
    ``svg:title`` element for the title. Parsing stops at the end of the RDF block, so a
    big drawing after it is not parsed. Returns "bad_svg" for XML that cannot be parsed up to
    the metadata (an empty file, malformed markup, a root that is not ``svg``).
    """
    meta, fallback_title = None, ""
    try:
        events = ET.iterparse(io.BytesIO(data), events=("start", "end"))
        _, root = next(events)
        if root.tag not in (f"{{{NS['svg']}}}svg", "svg"):
            return "bad_svg"
        for event, element in events:
            if event != "end":
                continue
            if element.tag == f"{{{NS['rdf']}}}RDF":
                meta = _work_metadata(element)
            elif element.tag == f"{{{NS['svg']}}}title" and not fallback_title:
                fallback_title = _text(element)
            if element.tag in _METADATA_END and meta is not None:
                break
    except (ET.ParseError, StopIteration, ValueError):
        if meta is None and not fallback_title:
            return "bad_svg"
    meta = meta or SvgMeta()
    if not meta.title:
        meta.title = fallback_title
    return meta


class _CpuTimeLimit:
    """Raise RenderTimeout in the block after ``seconds`` of this process's CPU time; ``fired`` says
    whether the limit was reached.

    CPU time, not wall time: on a loaded machine a wall-clock limit would skip different files
    from run to run. A no-op off the main thread or where there is no SIGPROF (Windows).

    Check ``fired`` after the block, not only the exception: Python runs the signal handler at the
    next bytecode, and when that is inside a garbage-collector callback or a ``__del__`` the
    exception is printed and dropped, and the block runs on to its end.
    """

    def __init__(self, seconds: float):
        main_thread = threading.current_thread() is threading.main_thread()
        self.active = seconds > 0 and hasattr(signal, "SIGPROF") and main_thread
        self.seconds = seconds
        self.fired = False

    def _on_limit(self, signum, frame):
        self.fired = True
        raise RenderTimeout

    def __enter__(self):
        if self.active:
            self.previous = signal.signal(signal.SIGPROF, self._on_limit)
            signal.setitimer(signal.ITIMER_PROF, self.seconds)
        return self

    def __exit__(self, *exc):
        if self.active:
            signal.setitimer(signal.ITIMER_PROF, 0)
            signal.signal(signal.SIGPROF, self.previous)
        return False


def _on_white_square(png: bytes, size: int) -> Image.Image:
    """Composite a (possibly transparent) render onto white, centred in a size×size square."""
    with Image.open(io.BytesIO(png)) as im:
        rgba = im.convert("RGBA")
    if rgba.size != (size, size):  # cairosvg renders the requested size; guard anyway
        rgba.thumbnail((size, size))
    canvas = Image.new("RGBA", (size, size), (255, 255, 255, 255))
    canvas.alpha_composite(rgba, ((size - rgba.width) // 2, (size - rgba.height) // 2))
    return canvas.convert("RGB")


def encode_image(image: Image.Image) -> tuple[str, bytes]:
    """("png", bytes), or ("jpg", bytes) when the JPEG is at most JPEG_IF_BELOW of the PNG."""
    png, jpg = io.BytesIO(), io.BytesIO()
    image.save(png, format="PNG")
    image.save(jpg, format="JPEG", quality=JPEG_QUALITY)
    if jpg.tell() <= JPEG_IF_BELOW * png.tell():
        return "jpg", jpg.getvalue()
    return "png", png.getvalue()


def rasterise(data: bytes, size: int, timeout_s: float = 0) -> tuple[str, bytes] | str:
    """SVG bytes -> (extension, encoded size×size RGB image), the drawing scaled to fit (its
    aspect ratio kept, as the SVG's preserveAspectRatio says) and centred on white.

    Returns a skip kind instead: "timeout" (over ``timeout_s`` CPU seconds; 0 = no limit),
    "render_error" (any exception from cairosvg or Pillow) or "blank_render" (all white,
    e.g. a file holding only gradient definitions). Raises ImportError without cairosvg.
    """
    try:
        import cairosvg
    except (ImportError, OSError) as e:  # OSError: cairocffi finds no libcairo
        raise ImportError(CAIROSVG_HINT) from e
    limit = _CpuTimeLimit(timeout_s)
    try:
        with limit:
            # unsafe=False (the default): no external files or entities are fetched
            png = cairosvg.svg2png(bytestring=data, output_width=size, output_height=size)
            image = _on_white_square(png, size)
    except RenderTimeout:
        return "timeout"
    except Exception:  # cairosvg raises anything from ValueError to cairo errors on bad input
        return "timeout" if limit.fired else "render_error"
    if limit.fired:  # the timeout's exception was swallowed where the handler ran (see _CpuTimeLimit)
        return "timeout"
    if image.convert("L").getextrema()[0] > BLANK_LEVEL:
        return "blank_render"
    return encode_image(image)


_in_worker = False  # set in converter worker processes only (see init_worker)


def init_worker() -> None:
    """Pool initializer: let :func:`render_task` reset cairo's global state before each file
    with text."""
    global _in_worker
    _in_worker = True


_TEXT_ELEMENT = re.compile(rb"<(?:\w+:)?(?:text|flowRoot)\b")


def _reset_cairo() -> None:
    """Forget cairo's process-wide font caches, so that how text renders does not depend on
    which files this worker drew before (pools hand out files in a timing-dependent order).
    Only safe with no live cairo object, hence worker processes only, after a collection.
    It costs a font lookup per file, so only files with text elements pay it."""
    gc.collect()
    try:
        import cairocffi

        cairocffi.cairo.cairo_debug_reset_static_data()
    except Exception:  # another cairo binding: keep rendering, only text may then vary
        pass


def render_task(task: tuple[int, str, int, float]) -> tuple[int, tuple[str, bytes] | str]:
    """Pool worker: ``(index, path, size, timeout_s)`` -> ``(index, rasterise(...) or skip kind)``."""
    index, path, size, timeout_s = task
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError:
        return index, "unreadable_file"
    if _in_worker and _TEXT_ELEMENT.search(data):
        _reset_cairo()
    return index, rasterise(data, size, timeout_s)
