"""The training image path: uint8 batches normalised on the device equal the float pipeline they
replace (bit for bit with Pillow's resize, within two levels of 255 with torch's); reduced-scale
JPEG decoding keeps every crop at least the output size."""

from __future__ import annotations

import contextlib
import io
import itertools

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tests.test_stream import MEAN, STD, _loader, _take
from vlp.data.decode import DecodeOptions, decode_image
from vlp.data.shardlists import expand_urls
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.transforms import CROP_RATIO, DeviceNormalize, draft_min_side, train_transform
from vlp.models.tokenizer import get_tokenizer

CPU = torch.device("cpu")


def _photo(w: int, h: int, seed: int = 0, mode: str = "RGB") -> Image.Image:
    """Smooth colour field plus noise: JPEG-compressible like a photo, with detail to lose."""
    rng = np.random.default_rng(seed)
    field = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    pixels = np.asarray(field, dtype=np.int16) + rng.normal(0, 6, (h, w, 3)).astype(np.int16)
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).convert(mode)


def _encode(image: Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 90} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _seeded(fn, image, seed):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return fn(image)


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA", "P"])
def test_uint8_then_device_normalise_equals_open_clip_float_transform(scale, mode):
    """The previous pipeline (open_clip's train transform: crop, ToTensor, Normalize) and the new
    one (same crop to uint8, then DeviceNormalize) give identical floats for the same image and seed."""
    old = open_clip.image_transform(64, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": scale})
    new, normalize = train_transform(64, scale, resize="pil"), DeviceNormalize(MEAN, STD)
    for seed, (w, h) in enumerate([(64, 64), (97, 61), (300, 200), (50, 180)]):
        image = _photo(w, h, seed, mode)
        want = _seeded(old, image, seed)
        got8 = _seeded(new, image, seed)
        assert got8.dtype == torch.uint8 and got8.shape == (3, 64, 64)
        got = normalize(got8[None], CPU)[0]
        assert got.dtype == torch.float32
        assert torch.equal(got, want), (mode, w, h, (got - want).abs().max())


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.08, 1.0)])
@pytest.mark.parametrize("mode", ["RGB", "L", "RGBA"])
def test_torch_resize_is_within_two_levels_of_open_clips_pixels(scale, mode):
    """The default crop (torch's uint8 bicubic) takes open_clip's crop box for the same seed and
    differs from its pixels by at most 2 of 255, rarely: downscaling, upscaling and odd sizes."""
    old = open_clip.image_transform(64, is_train=True, mean=(0, 0, 0), std=(1, 1, 1), aug_cfg={"scale": scale})
    new = train_transform(64, scale)
    assert new(_photo(80, 80)).shape == (3, 64, 64)
    for seed, (w, h) in enumerate([(64, 64), (97, 61), (300, 200), (50, 180), (20, 30), (1000, 700)]):
        image = _photo(w, h, seed, mode)
        want = (_seeded(old, image, seed) * 255).round().to(torch.int16)
        got = _seeded(new, image, seed)
        assert got.dtype == torch.uint8 and got.shape == (3, 64, 64)
        diff = (got.to(torch.int16) - want).abs()
        assert diff.max() <= 2 and diff.float().mean() < 0.25, (mode, w, h, diff.max(), diff.float().mean())
    with pytest.raises(ValueError, match="'torch' or 'pil'"):
        train_transform(64, scale, resize="cv2")


def test_stream_batches_normalised_equal_the_float_stream(shapes_shards):
    """Whole batches: the uint8 stream + DeviceNormalize equals the same stream built with the
    previous float transform (same seed, so the same samples and crops)."""
    spec = dict(sources=[expand_urls(shapes_shards["train"])])
    float_tf = open_clip.image_transform(64, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": (0.9, 1.0)})
    tok = get_tokenizer("debug")
    old = StreamLoader(StreamSpec(batch_size=8, seed=2, shuffle_buffer=20, **spec), float_tf, tok, workers=0)

    def loader(transform):
        return StreamLoader(StreamSpec(batch_size=8, seed=2, shuffle_buffer=20, **spec), transform, tok, 0)

    new, fast = loader(train_transform(64, resize="pil")), loader(train_transform(64))
    normalize, level = DeviceNormalize(MEAN, STD), 1 / 255 / min(STD) + 1e-6  # one uint8 level, normalised
    for a, b, c in itertools.islice(zip(old, new, fast), 4):
        assert a["__key__"] == b["__key__"] == c["__key__"] and b["image"].dtype == c["image"].dtype == torch.uint8
        assert torch.equal(normalize(b["image"], CPU), a["image"])
        diff = (normalize(c["image"], CPU) - a["image"]).abs()
        assert diff.max() <= 2 * level and (diff > level / 2).float().mean() < 0.02  # sharp edges: 2 levels, rarely


def test_device_normalize_passes_float_through_and_rejects_other_dtypes():
    normalize = DeviceNormalize(MEAN, STD)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    assert normalize(x, "cpu") is x  # already preprocessed: eval transforms, cached features, tests
    with pytest.raises(TypeError, match="uint8 or floating"):
        normalize(torch.zeros(1, 3, 4, 4, dtype=torch.int32), CPU)
    with pytest.raises(ValueError, match="3 values"):
        DeviceNormalize([0.5], [0.5, 0.5, 0.5])


def test_forward_backward_needs_the_normaliser_for_uint8():
    from vlp.config import LossConfig
    from vlp.losses import Objective
    from vlp.models.registry import build_model
    from vlp.train.step import forward_backward

    torch.manual_seed(0)
    model, mean, std = build_model("debug")
    model.eval()  # no dropout: the two forwards below must be the same computation
    batch = {"image": torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8), "text": torch.randint(1, 400, (4, 32))}
    kw = dict(device=CPU, autocast=contextlib.nullcontext, scaler=torch.amp.GradScaler("cpu", enabled=False))
    with pytest.raises(TypeError, match="DeviceNormalize"):
        forward_backward(model, Objective(LossConfig()), [batch], **kw)
    normalize = DeviceNormalize(mean, std)
    loss, _, _ = forward_backward(model, Objective(LossConfig()), [batch], images=normalize, **kw)
    model.zero_grad()
    as_float = {**batch, "image": normalize(batch["image"], CPU)}
    assert torch.equal(loss, forward_backward(model, Objective(LossConfig()), [as_float], **kw)[0])


def test_draft_min_side_rule():
    assert draft_min_side(224, (0.9, 1.0)) == 273  # 224 / sqrt(0.9 * 3/4)
    assert draft_min_side(224, (1.0, 1.0)) == 259
    assert draft_min_side(224, (0.08, 1.0)) == 915
    assert draft_min_side(224, (0.0, 1.0)) == 0  # crops may be arbitrarily small: never reduce


@pytest.mark.parametrize("scale", [(0.9, 1.0), (0.5, 1.0), (0.08, 1.0)])
def test_every_crop_of_the_reduced_image_keeps_the_output_size(scale):
    """For many image sizes: decode at the draft scale, then every random resized crop's short side
    is still >= the output size, i.e. the crop is never upsampled (as at full resolution)."""
    from torchvision.transforms import RandomResizedCrop

    size, need = 224, draft_min_side(224, scale)
    torch.manual_seed(0)
    for w, h in [(need, need), (2 * need, 2 * need), (2 * need - 1, 4 * need), (5000, 2 * need + 3)]:
        w, h = int(w), int(h)
        data = _encode(Image.new("RGB", (w, h), (90, 120, 30)), "JPEG")
        image, problem = decode_image(data, 10**9, need)
        assert not problem and min(image.size) >= need
        assert image.size[0] < w or min(w, h) < 2 * need  # reduced whenever 1/2 scale keeps `need`
        for _ in range(200):
            i, j, ch, cw = RandomResizedCrop.get_params(image, scale, CROP_RATIO)
            assert min(ch, cw) >= size, (w, h, image.size, ch, cw)


def test_draft_decode_sizes_and_non_jpeg_unchanged():
    photo = _photo(1100, 800)
    jpeg, png = _encode(photo, "JPEG"), _encode(photo, "PNG")
    full, _ = decode_image(jpeg, 10**9)
    half, _ = decode_image(jpeg, 10**9, 273)  # 1/2: 550 x 400 (1/4 would leave 200 < 273)
    assert full.size == (1100, 800) and half.size == (550, 400) and half.mode == "RGB"
    eighth, _ = decode_image(jpeg, 10**9, 100)
    assert eighth.size == (138, 100)
    small, _ = decode_image(_encode(_photo(300, 280), "JPEG"), 10**9, 273)
    assert small.size == (300, 280)  # too small to reduce: decoded as without draft
    png_full, png_draft = decode_image(png, 10**9)[0], decode_image(png, 10**9, 273)[0]
    assert png_draft.size == (1100, 800) and np.array_equal(np.asarray(png_full), np.asarray(png_draft))
    # the header check still sees the full size
    assert decode_image(jpeg, 1100 * 800 - 1, 273) == (None, "image_too_large")
    gray, _ = decode_image(_encode(_photo(600, 600, mode="L"), "JPEG"), 10**9, 273)
    assert gray.mode == "RGB" and gray.size == (300, 300)


def test_draft_decode_changes_the_crop_little():
    """Reduced-scale decoding then resizing to 224 is close to the full-size path (the DCT's
    averaging and bicubic filtering differ a little): mean absolute difference < 1.5 / 255."""
    from torchvision.transforms import functional as F

    jpeg = _encode(_photo(1024, 768, seed=3), "JPEG")
    full, half = decode_image(jpeg, 10**9)[0], decode_image(jpeg, 10**9, 273)[0]
    assert half.size == (512, 384)
    a = F.pil_to_tensor(F.center_crop(F.resize(full, 224, Image.BICUBIC), 224)).float()
    b = F.pil_to_tensor(F.center_crop(F.resize(half, 224, Image.BICUBIC), 224)).float()
    assert (a - b).abs().mean() < 1.5


def test_train_stream_decodes_jpegs_at_reduced_scale(tmp_path):
    """The stream passes DecodeOptions.draft_min_side to the decoder: with it, a 1200 px JPEG
    shard gives the same crop positions at half the decode size (output size unchanged)."""
    from tests.conftest import write_tar

    samples = [{"__key__": f"j{i}", "jpg": _encode(_photo(1200, 1000, i), "JPEG"), "txt": b"a photo"} for i in range(4)]
    write_tar(tmp_path / "j-000000.tar", samples)
    seen = []

    def spy(image):
        seen.append(image.size)
        return train_transform(64)(image)

    need = draft_min_side(64, (0.9, 1.0))
    assert need == 78
    spec = StreamSpec(
        sources=[[str(tmp_path / "j-000000.tar")]], batch_size=4, decode=DecodeOptions(draft_min_side=need)
    )
    batch = next(iter(StreamLoader(spec, spy, get_tokenizer("debug"), 0)))
    assert batch["image"].shape == (4, 3, 64, 64) and batch["image"].dtype == torch.uint8
    assert seen == [(150, 125)] * 4  # 1/8 scale keeps >= 78 px on both sides


def test_second_iteration_restarts_from_the_build_position(shapes_shards):
    """Persistent workers are reused by a second iteration, which (as without them) starts again
    where the loader was built, and the tracked position follows."""
    loader = _loader(shapes_shards["train"], batch_size=8, workers=2, seed=4)
    first = _take(loader, 3)
    state = loader.state_dict()
    again = _take(loader, 3)
    assert [b["__key__"] for b in first] == [b["__key__"] for b in again]
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))
    assert loader.state_dict() == state


def test_close_stops_the_persistent_workers(shapes_shards):
    loader = _loader(shapes_shards["train"], batch_size=8, workers=2)
    _take(loader, 2)
    workers = list(loader._loader._iterator._workers)
    assert len(workers) == 2 and all(w.is_alive() for w in workers)
    state = loader.state_dict()
    loader.close()
    assert not any(w.is_alive() for w in workers)
    assert loader.state_dict() == state  # the position is still there for a checkpoint
    with pytest.raises(RuntimeError, match="closed"):
        next(iter(loader))
