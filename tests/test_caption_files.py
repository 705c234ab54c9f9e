"""Messy captions files and images in `vlp shards --captions` (issue #28): each kind of mess is converted,
skipped and counted, or stopped with one line naming the file, the line and the fix."""

from __future__ import annotations

import gzip
import io
import json
import logging
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

from tests.conftest import run_main
from vlp.data.caption_files import shard_image, token_count, write_caption_shards
from vlp.data.images import open_image
from vlp.data.shards import INFO_FILE, ShardError
from vlp.data.textfiles import TextFileError, read_text, text_lines

CP1252_CAPTION = "\u201cthe blue one\u201d \u2013 caf\u00e9 style"  # curly quotes, en dash, é: all cp1252


def members(out: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of every shard in ``out``."""
    found: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for m in tar.getmembers():
                key, ext = m.name.split(".", 1)
                found.setdefault(key, {})[ext] = tar.extractfile(m).read()
    return found


def captions_of(out: Path) -> list[str]:
    return [m["txt"].decode("utf-8") for _, m in sorted(members(out).items())]


@pytest.fixture()
def folder(tmp_path) -> Path:
    """Three small images: a.png (red), b.jpg (green), c.png (blue)."""
    for name, colour in (("a.png", "red"), ("b.jpg", "green"), ("c.png", "blue")):
        Image.new("RGB", (8, 6), colour).save(tmp_path / name)
    return tmp_path


def write(path: Path, text: str, encoding: str = "utf-8", newline: str = "\n") -> Path:
    path.write_bytes(text.replace("\n", newline).encode(encoding))
    return path


def pack(captions: Path, **kwargs) -> dict:
    return write_caption_shards(captions, captions.parent / "out", progress=False, **kwargs)


# ---------------------------------------------------------------- encodings and line ends


def test_cp1252_csv_stops_naming_line_column_and_encoding_then_reads_with_it(folder):
    caps = write(folder / "caps.csv", f"image,caption\na.png,red\nc.png,{CP1252_CAPTION}\n", "cp1252", "\r\n")
    proc = run_main("shards", "--captions", caps, "--out", folder / "out", check=False)
    assert proc.returncode == 2 and not (folder / "out").exists()
    assert proc.stderr.strip() == (
        f"vlp shards: error: {caps}:3: not valid utf-8 (byte 0x93 at column 7); "
        "re-run with --encoding cp1252 (or the file's encoding), or save the file as UTF-8"
    )
    proc = run_main("shards", "--captions", caps, "--out", folder / "out", "--encoding", "cp1252")
    assert "wrote 2 samples" in proc.stdout
    assert captions_of(folder / "out") == ["red", CP1252_CAPTION]
    assert json.loads((folder / "out" / INFO_FILE).read_text())["encoding"] == "cp1252"


@pytest.mark.parametrize("ext,sep", [(".csv", ","), (".tsv", "\t")])
@pytest.mark.parametrize("encoding", ["utf-16", "utf-8-sig", "utf-32"])
def test_byte_order_marks_decide_the_encoding(folder, ext, sep, encoding):
    # Excel's "Unicode text" is UTF-16 with a BOM and CRLF; whatever --encoding says, the BOM wins
    text = f"image{sep}caption{sep}note\na.png{sep}{CP1252_CAPTION}{sep}\u4e2d\u6587\n"
    info = pack(write(folder / f"caps{ext}", text, encoding, "\r\n"), encoding="cp1252")
    assert info["num_samples"] == 1 and captions_of(folder / "out") == [CP1252_CAPTION]
    assert json.loads(members(folder / "out")["000000000"]["json"]) == {"note": "\u4e2d\u6587"}


@pytest.mark.parametrize("newline", ["\r\n", "\r"])
@pytest.mark.parametrize("ext", [".jsonl", ".csv", ".tsv"])
def test_crlf_and_cr_line_ends(folder, ext, newline):
    if ext == ".jsonl":
        rows = ({"image": "a.png", "caption": "red", "k": "v"}, {}, {"image": "c.png", "caption": "blue"})
        text = "".join((json.dumps(row) if row else "") + "\n" for row in rows)  # {}: a blank line
    else:
        sep = "," if ext == ".csv" else "\t"
        text = f"image{sep}caption{sep}k\na.png{sep}red{sep}v\n\nc.png{sep}blue{sep}\n"
    info = pack(write(folder / f"caps{ext}", text, newline=newline))
    assert info["num_samples"] == 2 and captions_of(folder / "out") == ["red", "blue"]
    assert json.loads(members(folder / "out")["000000000"]["json"]) == {"k": "v"}


def test_undecodable_byte_is_located_past_the_first_chunk(tmp_path):
    # > 64 KiB of CRLF lines with multi-byte characters before the bad byte: the incremental decoder's
    # chunk and buffer boundaries must not shift the line or the column
    path = tmp_path / "big.tsv"
    path.write_bytes(("x\u00e9\u4e2d\tline\r\n" * 9000).encode("utf-8") + "ab\u00e9 ".encode("utf-8") + b"\xff\r\n")
    with pytest.raises(TextFileError, match=r"big\.tsv:9001: not valid utf-8 \(byte 0xff at column 5\)"):
        list(text_lines(path, option="--encoding"))
    assert read_text(path, "latin-1").count("\r\n") == 9001  # the bytes themselves are fine in latin-1


def test_utf16_without_bom_is_recognised(folder):
    caps = write(folder / "caps.tsv", "image\tcaption\na.png\tred\n", "utf-16-le")
    proc = run_main("shards", "--captions", caps, "--out", folder / "out", check=False)
    assert proc.returncode == 2 and "caps.tsv:1: NUL characters" in proc.stderr
    assert "--encoding utf-16-le" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert pack(caps, encoding="utf-16-le")["num_samples"] == 1


def test_unknown_encoding_is_one_line(folder):
    caps = write(folder / "caps.csv", "image,caption\na.png,red\n")
    proc = run_main("shards", "--captions", caps, "--out", folder / "out", "--encoding", "klingon", check=False)
    assert proc.returncode == 2 and "unknown text encoding 'klingon'" in proc.stderr


# ---------------------------------------------------------------- rows


def test_rows_with_extra_cells_are_skipped_and_counted(folder, caplog):
    caps = write(folder / "caps.csv", "image,caption\na.png,red\nc.png,blue, with a comma\nb.jpg,green,\n")
    with caplog.at_level(logging.WARNING, logger="vlp.data.caption_files"):
        info = pack(caps)
    # the comma row is not cut to "blue"; an empty extra cell (a trailing comma) holds nothing and is ignored
    assert captions_of(folder / "out") == ["red", "green"] and info["skipped"]["extra_fields"] == 1
    assert "line 3: extra_fields ('c.png')" in caplog.text
    proc = run_main("shards", "--captions", caps, "--out", folder / "o2")
    assert "'extra_fields': 1" in proc.stdout and "--extra-fields join" in proc.stdout


def test_extra_fields_join_restores_the_caption(folder):
    caps = write(folder / "caps.tsv", "image\tid\tcaption\na.png\t1\tred\tand\tmore\nc.png\t2\tblue\n")
    info = pack(caps, extra_fields="join")
    assert info["skipped"]["extra_fields"] == 0 and info["extra_fields"] == "join"
    assert captions_of(folder / "out") == ["red\tand\tmore", "blue"]
    assert json.loads(members(folder / "out")["000000000"]["json"]) == {"id": "1"}


def test_extra_fields_join_needs_the_caption_last(folder):
    caps = write(folder / "caps.csv", "image,caption,license\na.png,red,cc0\n")
    with pytest.raises(ShardError, match="caption column 'caption' must be the header's last, not 'license'"):
        pack(caps, extra_fields="join")
    assert not (folder / "out").exists()
    proc = run_main("shards", "--captions", caps, "--out", folder / "o", "--extra-fields", "join", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1


def test_duplicate_rows_are_skipped_but_other_captions_of_an_image_kept(folder):
    rows = [
        {"image": "a.png", "caption": "red"},
        {"image": "./a.png", "caption": " red "},  # the same file and caption, written differently
        {"image": str(folder / "a.png"), "caption": "red"},
        {"image": "a.png", "caption": "a red square"},  # another caption of the same image: kept
        {"image": "c.png", "caption": "red"},  # the same caption for another image: kept
    ]
    info = pack(write(folder / "caps.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert info["skipped"]["duplicate_row"] == 2 and info["num_samples"] == 3
    assert captions_of(folder / "out") == ["red", "a red square", "red"]


def test_a_caption_utf8_cannot_hold_is_skipped_not_a_crash(folder):
    lines = ['{"image": "a.png", "caption": "bad \\ud800 half", "x": "\\udc00"}', '{"image": "c.png", "caption": "ok"}']
    info = pack(write(folder / "caps.jsonl", "\n".join(lines) + "\n"))
    assert info["skipped"]["bad_caption_encoding"] == 1 and captions_of(folder / "out") == ["ok"]


# ---------------------------------------------------------------- images


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (8, 8), c) for c in ("red", "green", "blue")]
    buf = io.BytesIO()
    frames[0].save(buf, format=fmt, save_all=True, append_images=frames[1:], duration=100, loop=0)
    return buf.getvalue()


def test_animated_images_are_skipped(folder):
    for name, fmt in (("anim.gif", "GIF"), ("anim.webp", "WEBP"), ("anim.png", "PNG")):
        (folder / name).write_bytes(animated(fmt))
    rows = [{"image": n, "caption": f"clip {n}"} for n in ("anim.gif", "anim.webp", "anim.png", "a.png")]
    info = pack(write(folder / "caps.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert info["skipped"]["animated_image"] == 3 and info["num_samples"] == 1


def still_images() -> dict[str, Image.Image]:
    """Still images of formats the stream does not read, in modes PNG holds as they are."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (5, 7, 3), dtype=np.uint8))
    palette = rgb.quantize(16)
    palette.info["transparency"] = 3
    deep = Image.fromarray(rng.integers(0, 65536, (5, 7), dtype=np.uint16))  # I;16
    return {
        "rgb.bmp": rgb,
        "rgba.bmp": Image.fromarray(rng.integers(0, 256, (5, 7, 4), dtype=np.uint8), "RGBA"),
        "grey.tiff": rgb.convert("L"),
        "deep.tiff": deep,
        "still.gif": palette,
    }


def test_other_still_formats_become_lossless_pngs(folder):
    images = still_images()
    for name, image in images.items():
        image.save(folder / name, **({"transparency": 3} if name.endswith(".gif") else {}))
    rows = [{"image": n, "caption": f"picture {n}"} for n in images]
    info = pack(write(folder / "caps.jsonl", "".join(json.dumps(r) + "\n" for r in rows)))
    assert info["num_samples"] == 5 and info["converted"] == 5 and not any(info["skipped"].values())
    assert info["formats"] == {
        "png (converted from BMP)": 2,
        "png (converted from TIFF)": 2,
        "png (converted from GIF)": 1,
    }
    for name, sample in zip(images, [m for _, m in sorted(members(folder / "out").items())]):
        png, original = Image.open(io.BytesIO(sample["png"])), Image.open(folder / name)
        assert png.format == "PNG" and png.mode == original.mode and png.mode != "RGB" or "rgb" in name, name
        assert np.array_equal(np.asarray(png), np.asarray(original)), name
        assert png.info.get("transparency") == original.info.get("transparency"), name
        # the stream's decoder makes the same RGB of both
        rgb = [np.asarray(open_image(data)[0]) for data in (sample["png"], (folder / name).read_bytes())]
        assert np.array_equal(*rgb), name


@pytest.mark.parametrize("fmt", ["AVIF", "TIFF"])
def test_converted_png_is_turned_upright_at_read_time_as_the_original(folder, fmt):
    # stored sideways with EXIF Orientation 6 (a phone photo); Pillow turns TIFFs upright itself on load,
    # AVIFs not: then the PNG carries the tag over, and the reader turns both alike
    if fmt == "AVIF" and not features.check("avif"):
        pytest.skip("Pillow without AVIF")
    exif = Image.Exif()
    exif[0x0112] = 6
    original = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    Image.fromarray(original).save(folder / "side", format=fmt, exif=exif, tiffinfo={0x0112: 6}, quality=100)
    source = (folder / "side").read_bytes()
    data, ext, converted_from = shard_image(source)
    assert (ext, converted_from) == ("png", fmt)
    upright = [np.asarray(open_image(x)[0]) for x in (data, source)]
    assert upright[0].shape == (6, 4, 3) and np.array_equal(*upright)
    if fmt == "AVIF":
        png = Image.open(io.BytesIO(data))
        assert png.size == (6, 4) and png.getexif()[0x0112] == 6


def test_jpeg_png_webp_bytes_are_copied(folder):
    Image.new("RGB", (8, 6), "blue").save(folder / "d.webp")
    for name in ("a.png", "b.jpg", "d.webp"):
        data = (folder / name).read_bytes()
        assert shard_image(data)[0] == data
    assert shard_image(b"")[:2] == (None, "corrupt_image")


# ---------------------------------------------------------------- long captions


def test_captions_longer_than_the_context_are_counted(folder):
    from vlp.models.tokenizer import get_tokenizer

    tok = get_tokenizer("ViT-B-32")
    fits, cut = "a " * 75, "a " * 76  # "a" is one token; start and end make 77 and 78
    assert (token_count(tok, fits), token_count(tok, cut)) == (77, 78)
    assert int(tok(fits)[0, -1]) == tok.eot_token_id and int(tok(fits)[0].count_nonzero()) == 77  # nothing cut
    rows = [("a.png", fits), ("b.jpg", cut), ("c.png", "a small red square")]
    caps = write(folder / "caps.jsonl", "".join(json.dumps({"image": i, "caption": c}) + "\n" for i, c in rows))
    proc = run_main("shards", "--captions", caps, "--out", folder / "out")
    info = json.loads((folder / "out" / INFO_FILE).read_text())
    assert (info["long_captions"], info["model"], info["context_length"]) == (1, "ViT-B-32", 77)
    assert "1 caption is longer than ViT-B-32's 77-token context and will be cut in training" in proc.stdout
    info = pack(caps, model="debug", tokenizer=get_tokenizer("debug"))  # context 32: the two long ones
    assert (info["long_captions"], info["context_length"]) == (2, 32)


def test_token_count_of_a_hugging_face_tokenizer(tiny_hf_text):
    from vlp.models.tokenizer import _hf_tokenizer

    tok = _hf_tokenizer(str(tiny_hf_text), 16)
    short, long = "a red dog", " ".join(["a red dog"] * 10)
    assert token_count(tok, short) == int(tok(short)[0].count_nonzero()) == 5  # [CLS] a red dog [SEP]
    assert token_count(tok, long) == 32 > int(tok(long)[0].count_nonzero()) == 16


# ---------------------------------------------------------------- the output folder


def tiny_fashion_mnist(root: Path) -> Path:
    """Fashion-MNIST's four idx files with one image per class."""
    root.mkdir()
    labels = np.arange(10, dtype=np.uint8)
    for split in ("train", "t10k"):
        images = np.zeros((10, 28, 28), dtype=np.uint8)
        for name, array, magic in (("images-idx3", images, 3), ("labels-idx1", labels, 1)):
            header = bytes([0, 0, 8, magic]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
            (root / f"{split}-{name}-ubyte.gz").write_bytes(gzip.compress(header + array.tobytes()))
    return root


def test_unwritable_out_is_one_line_in_every_mode(folder):
    (folder / "afile").write_text("a regular file where a folder should be")
    out = folder / "afile" / "sub"
    caps = write(folder / "caps.csv", "image,caption\na.png,red\n")
    modes = (
        ["--captions", caps],
        ["--synthetic", "--num-samples", 4],
        ["--synthetic", "--eval-layouts", "--num-samples", 4],
        ["--from", "fashion-mnist", "--source", tiny_fashion_mnist(folder / "fm")],
    )
    for mode in modes:
        proc = run_main("shards", *mode, "--out", out, check=False)
        assert proc.returncode == 2, mode
        assert proc.stderr.strip().splitlines()[-1] == (
            f"vlp shards: error: cannot write to {out} (Not a directory); choose another --out"
        ), mode
        assert "Traceback" not in proc.stderr


def test_an_input_error_is_not_blamed_on_the_output(folder):
    proc = run_main(
        "shards", "--from", "fashion-mnist", "--source", folder / "nope", "--out", folder / "o", check=False
    )
    assert proc.returncode == 2 and "Fashion-MNIST not found" in proc.stderr and "cannot write" not in proc.stderr


# ---------------------------------------------------------------- quotes and JSON arrays


def test_a_stray_quote_in_an_unquoted_tsv_stops_instead_of_swallowing_rows(folder):
    text = 'image\tcaption\na.png\t"the best\nb.jpg\tsecond row\nc.png\tthird" row\n'
    caps = write(folder / "caps.tsv", text)
    proc = run_main("shards", "--captions", caps, "--out", folder / "out", check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{caps}:" in proc.stderr and "--quoting none" in proc.stderr
    info = pack(caps, quoting="none")  # the file uses no quoting: quotes are text
    assert captions_of(folder / "out") == ['"the best', "second row", 'third" row'] and info["num_samples"] == 3


def test_a_quote_pair_that_spans_rows_is_caught(folder):
    caps = write(folder / "caps.csv", 'image,caption\na.png,"a red\nb.jpg,a green" square\n')
    with pytest.raises(ShardError, match="malformed CSV"):
        pack(caps)
    caps = write(folder / "caps2.csv", 'image,caption\na.png,"a red\nb.jpg,a green"\nc.png,blue\n')
    with pytest.raises(ShardError, match=r"caps2.csv:2-3: a quoted field runs over 2 lines and holds what look like"):
        pack(caps)


def test_a_properly_quoted_caption_may_hold_line_breaks_commas_and_quotes(folder):
    caps = write(folder / "caps.csv", 'image,caption\na.png,"two\nlines, and ""quotes"""\nb.jpg,plain\n')
    pack(caps)
    assert captions_of(folder / "out") == ['two\nlines, and "quotes"', "plain"]


def test_a_json_file_holding_one_array_of_objects(folder):
    caps = write(folder / "caps.json", json.dumps([{"image": "a.png", "caption": "red"}, {"image": "b.jpg",
                                                    "caption": "green"}], indent=2))  # fmt: skip
    assert pack(caps)["num_samples"] == 2 and captions_of(folder / "out") == ["red", "green"]
    write(folder / "bad.json", '[{"image": "a.png", "caption": "red"}, 3]')
    with pytest.raises(ShardError, match="item 1 of the array is a int"):
        pack(folder / "bad.json")
