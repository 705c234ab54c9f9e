"""One decision for every image (vlp.data.images), the same in the training stream, the evaluation
loaders and `vlp shards`: EXIF orientation applied, alpha composited on a background, 16-bit
scaled, animated images skipped and counted; and a switch back to open_clip's exact pixels."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_main, write_tar
from vlp.data.decode import DecodeOptions, SkipCounter, decode_sample
from vlp.data.images import ImagePolicy, open_image, parse_background
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.eval.datasets import ImageList
from vlp.models.tokenizer import get_tokenizer

RED, BLUE = (220, 20, 20), (20, 20, 220)


def _encode(im: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _sideways_jpeg(orientation: int = 3, size=(32, 32)) -> bytes:
    """Top half red, bottom half blue as stored, with an EXIF orientation tag."""
    im = Image.new("RGB", size, BLUE)
    im.paste(RED, (0, 0, size[0], size[1] // 2))
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _encode(im, "JPEG", quality=98, exif=exif.tobytes())


def _sixteen_bit_grey(value=32768, size=(32, 32)) -> bytes:
    return _encode(Image.fromarray(np.full(size, value, np.uint16)), "PNG")


def _transparent(size=(32, 32)) -> bytes:
    """Fully transparent pixels whose stored colour is black, and an opaque red left half."""
    im = Image.new("RGBA", size, (0, 0, 0, 0))
    im.paste((*RED, 255), (0, 0, size[0] // 2, size[1]))
    return _encode(im, "PNG")


def _animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (16, 16), c) for c in (RED, BLUE)]
    return _encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100)


def _pixel(im, xy):
    return tuple(int(v) for v in np.asarray(im)[xy[1], xy[0]])


def test_exif_orientation_turns_the_image_upright():
    upright, _ = open_image(_sideways_jpeg(3))  # 180 degrees: the red half is now at the bottom
    assert _pixel(upright, (16, 28))[0] > 200 and _pixel(upright, (16, 3))[2] > 200
    turned, _ = open_image(_sideways_jpeg(6, size=(40, 20)))  # 90 degrees: width and height swap
    assert turned.size == (20, 40)
    as_stored, _ = open_image(_sideways_jpeg(3), ImagePolicy(exif_transpose=False))
    assert _pixel(as_stored, (16, 3))[0] > 200


def test_sixteen_bit_greyscale_is_scaled_not_clipped():
    grey, _ = open_image(_sixteen_bit_grey(32768))
    assert _pixel(grey, (0, 0)) == (128, 128, 128)  # was (255, 255, 255): Pillow clips 16-bit to 8
    dark, _ = open_image(_sixteen_bit_grey(257 * 10))
    assert _pixel(dark, (0, 0)) == (10, 10, 10)


@pytest.mark.parametrize("background, expected", [("white", (255, 255, 255)), ("#808080", (128, 128, 128))])
def test_alpha_is_composited_on_the_background(background, expected):
    im, _ = open_image(_transparent(), ImagePolicy(background=parse_background(background)))
    assert _pixel(im, (28, 5)) == expected and _pixel(im, (3, 5)) == RED
    dropped, _ = open_image(_transparent(), ImagePolicy(background=None))
    assert _pixel(dropped, (28, 5)) == (0, 0, 0)  # the colour stored under the transparency, as open_clip shows


def test_palette_and_grey_alpha_are_composited_too():
    pal = Image.new("P", (8, 8), 0)
    pal.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im, _ = open_image(_encode(pal, "PNG", transparency=0))
    assert _pixel(im, (0, 0)) == (255, 255, 255)
    la, _ = open_image(_encode(Image.new("LA", (8, 8), (10, 0)), "PNG"))
    assert _pixel(la, (0, 0)) == (255, 255, 255)


@pytest.mark.parametrize("fmt", ["WEBP", "GIF", "PNG"])
def test_animated_images_are_refused_the_same_way_in_every_format(fmt):
    assert open_image(_animated(fmt)) == (None, "animated_image")


def test_a_camera_multi_picture_jpeg_is_a_still_photo():
    photo = Image.new("RGB", (32, 32), RED)
    data = _encode(photo, "MPO", save_all=True, append_images=[Image.new("RGB", (8, 8), BLUE)])
    im, problem = open_image(data)
    assert problem == "" and _pixel(im, (5, 5))[0] > 200


def test_open_clip_parity_switch_gives_its_exact_pixels():
    """exif_transpose off and no background: Pillow's plain convert("RGB"), as open_clip decodes."""
    policy = ImagePolicy(exif_transpose=False, background=None)
    for data in (_sideways_jpeg(6), _transparent(), _encode(Image.new("P", (8, 8), 3), "PNG")):
        ours, _ = open_image(data, policy)
        theirs = Image.open(io.BytesIO(data)).convert("RGB")
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))


def _messy_samples() -> list[dict]:
    return [
        {"__key__": "exif", "jpg": _sideways_jpeg(3), "txt": b"a photo stored upside down"},
        {"__key__": "deep", "png": _sixteen_bit_grey(32768), "txt": b"a 16-bit grey scan"},
        {"__key__": "alpha", "png": _transparent(), "txt": b"a logo on transparency"},
        {"__key__": "anim", "webp": _animated("WEBP"), "txt": b"an animated sticker"},
    ]


def test_stream_and_eval_loader_decode_every_kind_the_same_way(tmp_path):
    write_tar(tmp_path / "m.tar", _messy_samples())
    to_array = lambda im: torch.from_numpy(np.asarray(im).copy())  # noqa: E731 - the decoded pixels themselves
    spec = StreamSpec(sources=[[str(tmp_path / "m.tar")]], batch_size=8, infinite=False, shuffle_buffer=0)
    loader = StreamLoader(spec, to_array, get_tokenizer("debug"), workers=0)
    (batch,) = list(loader)
    assert batch["__key__"] == ["exif", "deep", "alpha"]
    assert loader.skipped == {"animated_image": 1}
    streamed = dict(zip(batch["__key__"], batch["image"]))
    assert streamed["exif"][28, 16, 0] > 200 and tuple(streamed["deep"][0, 0].tolist()) == (128, 128, 128)
    assert tuple(streamed["alpha"][5, 28].tolist()) == (255, 255, 255)
    images = [s[k] for s in _messy_samples() for k in ("jpg", "png", "webp") if k in s]
    items = [ImageList(images, to_array)[i] for i in range(4)]
    assert items[3] == (3, None, "animated_image")
    for key, (_, pixels, _) in zip(["exif", "deep", "alpha"], items):
        assert torch.equal(pixels, streamed[key]), key


def test_decode_sample_counts_an_animated_image():
    skips = SkipCounter()
    assert decode_sample(_messy_samples()[3], DecodeOptions(image_keys=("webp",)), skips) is None
    assert skips.counts == {"animated_image": 1}


def test_vlp_eval_alpha_background_is_checked(tmp_path):
    rows = tmp_path / "r.jsonl"
    rows.write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    proc = run_main("eval", "--model", "debug", "--task", "zeroshot_retrieval", "--data", rows,
                    "--alpha-background", "not-a-colour", "--output", tmp_path / "r.json", check=False)  # fmt: skip
    assert proc.returncode == 2 and "--alpha-background" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_and_caption_image_options_make_the_policy():
    from vlp.cli import build_parser
    from vlp.eval.cli import image_policy_of

    for command in ("eval", "caption"):
        extra = ["--task", "counting", "--data", "x"] if command == "eval" else ["--images", "x"]
        default = image_policy_of(build_parser().parse_args([command, *extra]))
        assert default.exif_transpose and default.background == (255, 255, 255)
        args = build_parser().parse_args([command, *extra, "--no-exif-transpose", "--alpha-background", "0,0,0"])
        policy = image_policy_of(args)
        assert not policy.exif_transpose and policy.background == (0, 0, 0)
