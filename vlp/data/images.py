"""One decision for every image, wherever it is read: `vlp shards`, the training stream and the
evaluation loaders all go through :func:`open_image` / :func:`to_rgb`, so an image means the same
pixels in each of them.

What happens to an image (the table in ``docs/data.md`` lists every case):

- **EXIF orientation** (phone photos stored sideways with an Orientation tag): the pixels are
  turned upright (``ImagePolicy.exif_transpose``, on by default). open_clip does not do this; turn
  it off for its exact pixels.
- **Transparency** (RGBA, LA, palette images with a transparent colour): composited over
  ``ImagePolicy.background`` (white by default), never dropped, so transparent areas do not take
  whatever colour happens to be stored under them. ``None`` drops the alpha channel as open_clip
  does.
- **16-bit and other deep modes** (``I;16`` greyscale PNGs, ``I``, ``F``): scaled to 8 bits
  (65535 -> 255) instead of clipped, which turns a 16-bit photo nearly white.
- **Animated or multi-frame images** (GIF, WebP, APNG, multi-page TIFF): skipped and counted as
  ``animated_image``; no frame is a faithful stand-in for the clip. A camera's multi-picture JPEG
  (MPO: the photo, then previews) is a still photo: its first picture is used.
- Bigger than ``max_pixels`` (read from the header, before decoding): ``image_too_large``.
- Zero bytes, unknown format, truncated or undecodable: ``corrupt_image``.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
from PIL import Image

from vlp.config.checks import parse_colour

# Problems, reported by the callers as skip kinds.
CORRUPT, TOO_LARGE, ANIMATED = "corrupt_image", "image_too_large", "animated_image"
_ORIENTATION = 0x0112
_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_DEEP_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


parse_background = parse_colour  # "white", "#rrggbb", "r,g,b" -> RGB; "none" -> None (alpha dropped)


@dataclass(frozen=True)
class ImagePolicy:
    """How every image is turned into RGB pixels (see the module docstring)."""

    exif_transpose: bool = True
    background: tuple[int, int, int] | None = (255, 255, 255)
    max_pixels: int = 50_000_000

    @classmethod
    def from_options(cls, exif_transpose: bool, alpha_background: str | None, max_pixels: int) -> ImagePolicy:
        return cls(bool(exif_transpose), parse_background(alpha_background), int(max_pixels))


def _scaled_to_8bit(im: Image.Image) -> Image.Image:
    """A greyscale ``L`` image from a 16-bit, 32-bit integer or float one, scaled, not clipped:
    16-bit modes map 0..65535 to 0..255; ``I`` and ``F`` are read as 16-bit when their values go
    above 255 (as Pillow's ``I`` images of 16-bit PNGs do), as 0..1 floats when ``F`` stays within
    1.0, and as 8-bit values otherwise."""
    x = np.asarray(im).astype(np.float64)
    top = float(x.max()) if x.size else 0.0
    if im.mode.startswith("I;16") or top > 255:
        x = x / 257.0
    elif im.mode == "F" and top <= 1.0:
        x = x * 255.0
    return Image.fromarray(np.clip(np.rint(x), 0, 255).astype(np.uint8), mode="L")


def to_rgb(im: Image.Image, policy: ImagePolicy = ImagePolicy()) -> Image.Image:
    """The image as 8-bit RGB under ``policy`` (orientation, alpha, bit depth); ``im`` is loaded."""
    if policy.exif_transpose:
        im = _upright(im)
    if im.mode == "RGB":
        return im
    if im.mode in _DEEP_MODES:
        return _scaled_to_8bit(im).convert("RGB")
    has_alpha = im.mode in _ALPHA_MODES or (im.mode in ("P", "L", "RGB") and "transparency" in im.info)
    if has_alpha and policy.background is not None:
        rgba = im.convert("LA").convert("RGBA") if im.mode == "La" else im.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (*policy.background, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if im.mode == "La":
        im = im.convert("LA")
    return im.convert("RGB")


def _upright(im: Image.Image) -> Image.Image:
    try:
        orientation = im.getexif().get(_ORIENTATION, 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still good, keep them as stored
        return im
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is None:
        return im
    out = im.transpose(method)
    out.info = {k: v for k, v in im.info.items() if k != "exif"}  # keeps "transparency"
    return out


def open_image(data: bytes, policy: ImagePolicy = ImagePolicy(), min_side: int = 0) -> tuple[Image.Image | None, str]:
    """Encoded bytes -> ``(RGB image, "")`` or ``(None, problem)``, problem one of ``corrupt_image``,
    ``image_too_large``, ``animated_image``. The size is checked from the header before any pixel
    is decoded.

    With ``min_side`` > 0 a JPEG is decoded at the smallest of 1/1, 1/2, 1/4, 1/8 scale whose
    width and height both stay >= ``min_side`` (libjpeg's scaled inverse DCT; see
    :mod:`vlp.data.transforms`). Other formats decode at full size.
    """
    image, problem = _decoded(data, policy.max_pixels, min_side)
    if image is None:
        return None, problem
    try:
        return to_rgb(image, policy), ""
    except Exception:  # noqa: BLE001 - a mode Pillow cannot convert is bad data, not a crash
        return None, CORRUPT


def _decoded(data: bytes, max_pixels: int, min_side: int = 0) -> tuple[Image.Image | None, str]:
    if not data:
        return None, CORRUPT
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
            if w * h > max_pixels:
                return None, TOO_LARGE
            # a camera's MPO is a JPEG photo with more pictures (a preview, a second eye) after it: the
            # first frame is the photo, so it is a still image, not an animation
            if getattr(im, "is_animated", False) and im.format != "MPO":
                return None, ANIMATED
            if min_side > 0 and im.format == "JPEG":
                im.draft("RGB", (min_side, min_side))
            im.load()
            return im, ""
    except Image.DecompressionBombError:
        return None, TOO_LARGE
    except Exception:  # noqa: BLE001 - Pillow raises many kinds for damaged files
        return None, CORRUPT


def inspect_image(data: bytes, max_pixels: int = 50_000_000) -> tuple[Image.Image | None, str]:
    """The decoded (not converted) image of ``data`` and its problem, for writers that check an
    image without changing its bytes (`vlp shards`): the same checks as :func:`open_image`.
    ``image.format`` names the file format."""
    image, problem = _decoded(data, max_pixels)
    if image is None:
        return None, problem
    try:
        to_rgb(image)
    except Exception:  # noqa: BLE001
        return None, CORRUPT
    return image, ""
