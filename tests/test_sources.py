"""Dataset converters: OpenClipart SVGs -> shards, Fashion-MNIST idx -> class folders, captions.

The fast tests build tiny SVG trees and idx files in tmp_path; the tests marked ``real`` use
the Debian packages when they are installed and skip (saying which) when not.
"""

from __future__ import annotations

import contextlib
import gzip
import importlib.util
import io
import json
import os
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlp.cli import main
from vlp.data.shards import ShardError
from vlp.data.sources import captions, fashion_mnist, svg
from vlp.data.sources.openclipart import write_openclipart_shards
from vlp.eval.datasets import load_classification, load_retrieval

HAS_CAIROSVG = importlib.util.find_spec("cairosvg") is not None
needs_cairosvg = pytest.mark.skipif(not HAS_CAIROSVG, reason="cairosvg not installed (pip install 'vlp[real]')")
REAL_OPENCLIPART = Path("/usr/share/openclipart/svg")
REAL_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

SVG = """<?xml version="1.0" encoding="UTF-8"?>
<svg xmlns="http://www.w3.org/2000/svg" xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"
     xmlns:dc="http://purl.org/dc/elements/1.1/" xmlns:cc="http://web.resource.org/cc/"
     width="{w}" height="{h}" viewBox="0 0 {w} {h}">
  <metadata><rdf:RDF><cc:Work rdf:about="">
    <dc:title>{title}</dc:title>
    <dc:subject><rdf:Bag>{keywords}</rdf:Bag></dc:subject>
    <dc:creator><cc:Agent><dc:title>Jane Doe</dc:title></cc:Agent></dc:creator>
  </cc:Work></rdf:RDF></metadata>
  {body}
</svg>
"""
# (category folder, file stem, title, keywords); 12 unique titles, "gramastar" four times
CLIPART = [
    (
        "food",
        "apple",
        "Red_Apple",
        ["fruit", "food", "0x8f3a2c1d", "icon", "a", "12345", "apple", "Jane Doe", "clip art"],
    ),
    ("food", "banana_01", "Yellow Banana", ["fruit", "theme"]),
    ("food", "grape", "Purple Grapes (Wed Aug 25 2004)", ["fruit", "vine"]),
    ("animals", "whale", "Blue Whale", ["mammal", "sea"]),
    ("animals", "frog", "green frog", ["amphibian"]),
    ("animals", "cat", "Orange Cat", ["pet", "mammal"]),
    ("animals", "bear", "Brown Bear", ["mammal", "forest"]),
    ("animals", "flamingo", "Pink Flamingo", ["bird"]),
    ("animals", "wolf", "Grey Wolf", ["mammal", "hash"]),
    ("animals", "crow", "Black Crow", ["bird"]),
    ("animals", "swan", "White Swan on a lake", ["bird", "water"]),
    ("animals", "giraffe", "Tall Giraffe", ["mammal", "savanna"]),
    *[("shapes", f"star_{i}", "gramastar", ["stars", "magick", "geometry"]) for i in range(4)],
]
COLORS = ["#c00", "#0a0", "#00c", "#a0a", "#fa0", "#0aa", "#555", "#a50", "#5a0", "#05a", "#a05", "#50a", "#333"]


def svg_text(title: str, keywords: list[str], body: str = "", w: int = 40, h: int = 30) -> str:
    items = "".join(f"<rdf:li>{k}</rdf:li>" for k in keywords)
    return SVG.format(title=title, keywords=items, body=body, w=w, h=h)


@pytest.fixture()
def clipart_dir(tmp_path) -> Path:
    """16 good SVGs in 3 categories plus one of each skip kind the fast tests cover."""
    root = tmp_path / "svg"
    for i, (category, stem, title, keywords) in enumerate(CLIPART):
        body = f'<rect x="5" y="5" width="30" height="20" fill="{COLORS[i % len(COLORS)]}"/>'
        (root / category).mkdir(parents=True, exist_ok=True)
        (root / category / f"{stem}.svg").write_text(svg_text(title, keywords, body, w=40 + i, h=30))
    (root / "misc").mkdir()
    (root / "misc" / "broken.svg").write_text('<svg xmlns="http://www.w3.org/2000/svg"><metadata><rdf:RDF')
    (root / "misc" / "untitled.svg").write_text(svg_text("", ["thing"], '<circle cx="9" cy="9" r="5"/>'))
    (root / "misc" / "empty_drawing.svg").write_text(svg_text("Nothing At All", ["void"]))
    cut = svg_text("Cut Off Drawing", ["paper"], '<rect x="1" y="1" width="9" height="9"/>')
    (root / "misc" / "cut_off.svg").write_text(cut[: cut.index("<rect") + 12])  # metadata intact, drawing not
    big = svg_text("Huge Drawing", ["big"], "<!--" + "x" * 20_000 + '--><circle cx="9" cy="9" r="5"/>')
    (root / "misc" / "huge.svg").write_text(big)
    os.symlink("../food/apple.svg", root / "misc" / "apple_link.svg")  # one file, two paths
    return root


def convert(src: Path, out: Path, **kwargs) -> dict:
    args = {"size": 32, "heldout_titles": 2, "val_titles": 2, "workers": 1, "max_svg_bytes": 10_000}
    return write_openclipart_shards(out, src, progress=False, **{**args, **kwargs})


def read_split(folder: Path) -> list[dict]:
    """Samples of every shard in ``folder``: {"key", "txt", "json", "image": PIL image}."""
    samples: dict[str, dict] = {}
    for shard in sorted(folder.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                data = tar.extractfile(member).read()
                sample = samples.setdefault(key, {"key": key})
                if ext == "txt":
                    sample["txt"] = data.decode()
                elif ext == "json":
                    sample["json"] = json.loads(data)
                else:
                    sample["image"] = Image.open(io.BytesIO(data))
    return list(samples.values())


# ---- captions -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Red_Apple", "red apple"),
        ("  Dog 03 Drawn  With Straight Lines ", "dog drawn with straight lines"),
        ("Part of the Flat Icon Collection (Wed Aug 25 23:29:46 2004)", "part of the flat icon collection"),
        ("Clipart by Steve Hall - United States - Ohio", "united states, ohio"),
        ("smiley111", "smiley"),
        ("arrow-down-seagreen", "arrow down seagreen"),
        ("t-shirt v0.1", "t-shirt"),
        ("2 dead frogs.svg", "2 dead frogs"),
        ("", ""),
    ],
)
def test_clean_title(raw, expected):
    assert captions.clean_title(raw) == expected


def test_caption_title_replaces_generic_and_batch_titles():
    assert captions.caption_title("Lemon SVG theme", "folder_yellow") == ("folder yellow", "file_name")
    assert captions.caption_title("Clipart by Nicu Buculei - nosmoke", "house") == ("house", "file_name")
    assert captions.caption_title("05_fullmoon_openclipart", "moon") == ("fullmoon", "metadata")
    assert captions.caption_title("Etiquette Icons", "42") == ("etiquette icons", "metadata")  # no better stem
    assert captions.caption_title("   ", "apple") == ("", "metadata")


def test_filter_keywords_drops_junk():
    keywords = ["Fruit", "food", "0x8f3a2c1d", "icon", "a", "12345", "apple", "Jane Doe", "clip art", "fruits", None]
    keywords += ["lemon_theme_icon", "a" * 30, "deadbeef42", "Healthy_Snack"]
    assert captions.filter_keywords(keywords, "red apple", creator="Jane Doe") == ["fruit", "food", "healthy snack"]
    listed = ["rome,italy", "space astronomy planet mars", "&eacute;toile"]
    assert captions.filter_keywords(listed, "mars") == ["rome", "italy", "space", "astronomy", "planet", "étoile"]


def test_caption_variants_are_deterministic_recipes():
    variants = captions.caption_variants("red apple", ["fruit", "food", "snack", "sweet"])
    assert variants == [
        "red apple, fruit, food, snack",
        "red apple",
        "a drawing of red apple",
        "an illustration of red apple, related to fruit and food",
    ]
    assert captions.primary_caption("red apple", ["fruit", "food", "snack", "sweet"]) == variants[0]
    assert captions.caption_variants("moon", []) == ["moon", "a drawing of moon"]


# ---- OpenClipart ---------------------------------------------------------------------------------


@needs_cairosvg
def test_openclipart_splits_captions_and_skips(clipart_dir, tmp_path):
    infos = convert(clipart_dir, tmp_path / "out")
    splits = {split: read_split(tmp_path / "out" / split) for split in ("train", "val", "heldout")}
    assert {s: len(v) for s, v in splits.items()} == {"train": 12, "val": 2, "heldout": 2}
    assert {s: i["num_samples"] for s, i in infos.items()} == {"train": 12, "val": 2, "heldout": 2}
    skipped = {k: v for k, v in infos["train"]["skipped"].items() if v}
    kinds = ("duplicate_file", "bad_svg", "no_title", "too_large", "blank_render", "render_error")
    assert skipped == dict.fromkeys(kinds, 1)
    assert infos["train"]["skipped_examples"]["render_error"] == ["misc/cut_off.svg"]
    on_disk = json.loads((tmp_path / "out" / "heldout" / "_info.json").read_text())
    assert on_disk["skipped"] == infos["heldout"]["skipped"] and on_disk["shards"] == "openclipart-{000000..000000}.tar"

    titles = {split: [s["json"]["title"] for s in samples] for split, samples in splits.items()}
    assert titles["train"].count("gramastar") == 4  # a repeated title never leaves train
    for split in ("val", "heldout"):
        assert not set(titles[split]) & set(titles["train"])
        for s in splits[split]:
            assert sum(t == s["json"]["title"] for ts in titles.values() for t in ts) == 1
    assert not set(titles["val"]) & set(titles["heldout"])
    for samples in splits.values():
        for s in samples:
            meta = s["json"]
            assert s["txt"] == meta["caption_variants"][0] == ", ".join([meta["title"], *meta["keywords"][:3]])
            assert meta["category"] == meta["source"].split("/")[0] and "captions" not in meta
            assert s["image"].size == (32, 32) and s["image"].convert("RGB").getpixel((0, 0)) == (255, 255, 255)
    apple = next(s["json"] for samples in splits.values() for s in samples if s["json"]["title"] == "red apple")
    assert apple["keywords"] == ["fruit", "food"] and apple["category"] == "food"
    assert apple["source"] == "food/apple.svg" and apple["raw_title"] == "Red_Apple"
    assert "an illustration of red apple, related to fruit and food" in apple["caption_variants"]

    heldout = load_retrieval(str(tmp_path / "out" / "heldout" / infos["heldout"]["shards"]))
    assert sorted(heldout.captions) == sorted(s["txt"] for s in splits["heldout"])


@needs_cairosvg
def test_openclipart_is_idempotent_and_rewrites_on_change(clipart_dir, tmp_path):
    out = tmp_path / "out"
    first = convert(clipart_dir, out)
    files = sorted(p for p in out.rglob("*") if p.is_file())
    mtimes = {p: p.stat().st_mtime_ns for p in files}
    assert convert(clipart_dir, out) == first
    assert {p: p.stat().st_mtime_ns for p in files} == mtimes
    changed = convert(clipart_dir, out, size=24)
    assert changed["train"]["size"] == 24 and read_split(out / "train")[0]["image"].size == (24, 24)


@needs_cairosvg
def test_openclipart_output_does_not_depend_on_workers(clipart_dir, tmp_path):
    convert(clipart_dir, tmp_path / "one", workers=1)
    convert(clipart_dir, tmp_path / "two", workers=2)
    for split in ("train", "val", "heldout"):
        shard = Path(split, "openclipart-000000.tar")
        assert (tmp_path / "one" / shard).read_bytes() == (tmp_path / "two" / shard).read_bytes()


@needs_cairosvg
def test_openclipart_limit_scales_splits_and_errors(clipart_dir, tmp_path):
    infos = convert(clipart_dir, tmp_path / "lim", limit=14, heldout_titles=500, val_titles=300)
    assert infos["train"]["limit"] == 14
    used = infos["heldout"]["num_samples"] + infos["val"]["num_samples"]
    assert infos["heldout"]["num_samples"] >= 1 and infos["val"]["num_samples"] >= 1
    assert used <= infos["train"]["eligible_titles"] // 2
    only_repeats = tmp_path / "stars"
    (only_repeats / "shapes").mkdir(parents=True)
    for i in range(3):
        star = clipart_dir / "shapes" / f"star_{i}.svg"
        (only_repeats / "shapes" / star.name).write_bytes(star.read_bytes())
    with pytest.raises(ShardError, match="unique titles"):
        convert(only_repeats, tmp_path / "none")


@needs_cairosvg
def test_rasterise_cpu_time_limit():
    circles = "".join(f'<circle cx="{i % 40}" cy="{i % 30}" r="3" fill="#{i % 999:03d}"/>' for i in range(3000))
    heavy = svg_text("Many Circles", [], circles).encode()
    assert svg.rasterise(heavy, 32, timeout_s=0.01) == "timeout"
    assert svg.rasterise(heavy, 32)[0] in ("png", "jpg")


@needs_cairosvg
def test_rasterise_timeout_counts_even_where_its_exception_is_swallowed(monkeypatch):
    """The CPU-limit signal may arrive inside a gc callback or __del__, where Python prints and drops
    the exception (seen with hypothesis's gc hook): the render is still reported as a timeout."""
    import cairosvg

    real = cairosvg.svg2png

    def swallowing(**kw):
        t0 = time.process_time()
        while time.process_time() - t0 < 0.2:  # the limit fires in here, and is dropped
            with contextlib.suppress(svg.RenderTimeout):
                sum(range(1000))
        return real(**kw)

    monkeypatch.setattr(cairosvg, "svg2png", swallowing)
    assert svg.rasterise(svg_text("Box", [], '<rect width="9" height="9"/>').encode(), 32, timeout_s=0.01) == "timeout"


@needs_cairosvg
def test_openclipart_dead_worker_is_an_error_not_a_hang(clipart_dir, tmp_path, monkeypatch):
    from vlp.data.sources import openclipart

    monkeypatch.setattr(openclipart, "STALL_MIN_S", 0)  # stall limit 20 × 1 ms: no result comes that fast
    with pytest.raises(ShardError, match="worker process probably crashed"):
        convert(clipart_dir, tmp_path / "out", timeout_s=0.001)


def test_openclipart_missing_source_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        write_openclipart_shards(tmp_path / "out", tmp_path / "nowhere")
    assert f"OpenClipart SVGs not found at {tmp_path / 'nowhere'}" in str(e.value)
    assert "apt-get install -y --no-install-recommends openclipart-svg" in str(e.value)
    assert "--source DIR" in str(e.value)


def test_openclipart_without_cairosvg_says_what_to_install(clipart_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "cairosvg", None)  # makes `import cairosvg` raise ImportError
    with pytest.raises(ImportError, match=r"pip install 'vlp\[real\]'"):
        convert(clipart_dir, tmp_path / "out")
    assert main(["shards", "--from", "openclipart", "--source", str(clipart_dir), "--out", str(tmp_path / "o")]) == 2
    assert "vlp[real]" in capsys.readouterr().err


@needs_cairosvg
def test_cli_shards_from_openclipart(clipart_dir, tmp_path, capsys):
    out = tmp_path / "cli"
    argv = ["shards", "--from", "openclipart", "--source", str(clipart_dir), "--out", str(out)]
    assert main([*argv, "--size", "24", "--heldout-titles", "1", "--val-titles", "1", "--workers", "1"]) == 0
    printed = capsys.readouterr().out
    assert "train 15, val 1, heldout 1" in printed and "openclipart-{000000..000000}.tar" in printed
    assert "skipped SVGs" in printed and "bad_svg" in printed
    assert main(["shards", "--from", "openclipart", "--source", str(tmp_path / "no"), "--out", str(out)]) == 2
    assert "openclipart-svg" in capsys.readouterr().err


# ---- Fashion-MNIST -------------------------------------------------------------------------------


def write_idx(path: Path, array: np.ndarray, magic_ndim: int | None = None) -> None:
    """An idx file (gzip) of uint8 ``array``; ``magic_ndim`` overrides the header's dim count."""
    header = bytes([0, 0, 0x08, magic_ndim or array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture()
def tiny_fashion(tmp_path) -> Path:
    """4 train and 2 test images per class; every pixel of an image equals 20 * label."""
    root = tmp_path / "fmnist"
    root.mkdir()
    for split, per_class in (("train", 4), ("t10k", 2)):
        labels = np.tile(np.arange(10), per_class)
        images = np.repeat((labels * 20)[:, None, None], 28 * 28, axis=1).reshape(-1, 28, 28)
        write_idx(root / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", labels)
    return root


def test_fashion_mnist_layout_loads_for_zeroshot(tiny_fashion, tmp_path):
    out = tmp_path / "fm"
    info = fashion_mnist.write_fashion_mnist(out, tiny_fashion, per_class_train=3, seed=1, progress=False)
    assert info["num_images"] == {"train": 30, "test": 20}
    assert sorted(p.name for p in (out / "train").iterdir() if p.is_dir())[9] == "09_ankle_boot"
    for split, n in (("train", 30), ("test", 20)):
        data = load_classification(out / split)
        assert len(data.images) == n and data.classnames == list(fashion_mnist.CLASSNAMES)
        assert data.templates and all("{c}" in t for t in data.templates)
        for path, label in zip(data.images, data.labels):
            assert np.asarray(Image.open(path)).max() == 20 * label
    again = fashion_mnist.write_fashion_mnist(out, tiny_fashion, per_class_train=3, seed=1, progress=False)
    assert again == info
    other = fashion_mnist.write_fashion_mnist(out, tiny_fashion, per_class_train=2, seed=1, progress=False)
    assert other["num_images"]["train"] == 20 and len(list((out / "train").rglob("*.png"))) == 20


def test_fashion_mnist_is_idempotent_and_subsamples_by_seed(tiny_fashion, tmp_path):
    out = tmp_path / "fm"
    fashion_mnist.write_fashion_mnist(out, tiny_fashion, per_class_train=2, progress=False)
    files = sorted(out.rglob("*.png"))
    mtimes = [p.stat().st_mtime_ns for p in files]
    fashion_mnist.write_fashion_mnist(out, tiny_fashion, per_class_train=2, progress=False)
    assert [p.stat().st_mtime_ns for p in files] == mtimes
    labels = np.tile(np.arange(10), 40)
    picks = [fashion_mnist.select(labels, 5, seed, "train") for seed in (0, 0, 1)]
    assert all(len(c) == 5 and (labels[c] == k).all() for k, c in enumerate(picks[0]))
    assert all((a == b).all() for a, b in zip(picks[0], picks[1]))
    assert any((a != b).any() for a, b in zip(picks[0], picks[2]))


def test_fashion_mnist_errors_name_the_file(tiny_fashion, tmp_path):
    bad = tiny_fashion / "t10k-labels-idx1-ubyte.gz"
    write_idx(bad, np.arange(20) % 10, magic_ndim=3)
    with pytest.raises(ShardError, match="t10k-labels-idx1-ubyte.gz.*magic number 00000803"):
        fashion_mnist.write_fashion_mnist(tmp_path / "fm", tiny_fashion, progress=False)
    bad.write_bytes(gzip.compress(bytes([0, 0, 8, 1]) + (20).to_bytes(4, "big") + bytes(5)))
    with pytest.raises(ShardError, match="t10k-labels-idx1-ubyte.gz: header says"):
        fashion_mnist.write_fashion_mnist(tmp_path / "fm", tiny_fashion, progress=False)
    bad.unlink()
    with pytest.raises(FileNotFoundError, match="apt-get install -y --no-install-recommends dataset-fashion-mnist"):
        fashion_mnist.write_fashion_mnist(tmp_path / "fm", tiny_fashion, progress=False)


def test_cli_shards_from_fashion_mnist(tiny_fashion, tmp_path, capsys):
    out = tmp_path / "fm"
    argv = ["shards", "--from", "fashion-mnist", "--source", str(tiny_fashion), "--out", str(out)]
    assert main([*argv, "--per-class-train", "1", "--per-class-test", "2"]) == 0
    printed = capsys.readouterr().out
    assert "train 10, test 20 images" in printed and f"--data {out}/test" in printed


# ---- the installed datasets ----------------------------------------------------------------------


@needs_cairosvg
@pytest.mark.skipif(not REAL_OPENCLIPART.is_dir(), reason=f"{REAL_OPENCLIPART} absent (Debian openclipart-svg)")
def test_real_openclipart_sample(tmp_path):
    # 60 files hold ~18 titles used once (1,375 files are "gramastar"): 3 + 3 need no scaling
    infos = write_openclipart_shards(tmp_path / "oc", size=64, heldout_titles=3, val_titles=3, limit=60, progress=False)
    assert infos["heldout"]["num_samples"] == 3 and infos["val"]["num_samples"] == 3
    assert infos["train"]["num_samples"] >= 30
    train = read_split(tmp_path / "oc" / "train")
    assert all(s["txt"] and s["json"]["category"] for s in train)
    assert len({s["json"]["category"] for s in train}) >= 3  # the seeded order mixes categories


@pytest.mark.skipif(
    not REAL_FASHION_MNIST.is_dir(), reason=f"{REAL_FASHION_MNIST} absent (Debian dataset-fashion-mnist)"
)
def test_real_fashion_mnist_sample(tmp_path):
    info = fashion_mnist.write_fashion_mnist(tmp_path / "fm", per_class_train=20, per_class_test=20, progress=False)
    assert info["num_images"] == {"train": 200, "test": 200}
    data = load_classification(tmp_path / "fm" / "test")
    assert data.classnames[9] == "ankle boot" and np.bincount(data.labels).tolist() == [20] * 10
    assert Image.open(data.images[0]).size == (28, 28)
