"""Tests for WebDataset shard writing (vlp.data.shards)."""

import csv
import io
import json
import logging
import tarfile
from pathlib import Path

import braceexpand
import numpy as np
import pytest
from PIL import Image

from vlp.data import synthetic
from vlp.data.caption_files import SKIP_KINDS, write_caption_shards
from vlp.data.shards import INFO_FILE, SIZES_FILE, ShardError, read_sizes, write_synthetic_shards


def tar_members(path: Path) -> dict[str, dict[str, bytes]]:
    """{key: {extension: bytes}} of one shard."""
    out: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, ext = member.name.split(".", 1)
            out.setdefault(key, {})[ext] = tar.extractfile(member).read()
    return out


def all_members(out_dir: Path, info: dict) -> dict[str, dict[str, bytes]]:
    merged: dict[str, dict[str, bytes]] = {}
    for name in braceexpand.braceexpand(info["shards"]):
        merged.update(tar_members(out_dir / name))
    return merged


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    info = write_synthetic_shards(out, 300, seed=4, max_samples_per_shard=64, progress=False)
    return out, info


def test_synthetic_shards_layout(synthetic_dir):
    out, info = synthetic_dir
    assert info["num_samples"] == 300 and info["num_shards"] == 5
    assert info["shards"] == "shapes-{000000..000004}.tar"
    assert sorted(p.name for p in out.glob("*.tar")) == [f"shapes-{i:06d}.tar" for i in range(5)]
    sizes = read_sizes(out)
    assert sizes == {f"shapes-{i:06d}.tar": n for i, n in enumerate([64, 64, 64, 64, 44])}
    assert sum(sizes.values()) == 300
    assert json.loads((out / INFO_FILE).read_text()) == info
    assert info["source"] == "synthetic" and info["skipped"] == {}
    assert info["classnames"] == synthetic.zeroshot_classnames()
    assert info["templates"] == list(synthetic.ZEROSHOT_TEMPLATES)
    assert (info["seed"], info["image_size"], info["single_group"]) == (4, 64, False)
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*"))


def test_synthetic_shards_content(synthetic_dir):
    out, info = synthetic_dir
    members = all_members(out, info)
    assert sorted(members) == [f"{i:09d}" for i in range(300)]
    assert all(set(m) == {"png", "txt", "json"} for m in members.values())
    for index in (0, 131, 299):
        scene = synthetic.make_scene(4, index)
        sample = members[f"{index:09d}"]
        assert sample["txt"].decode("utf-8") == scene.caption
        assert json.loads(sample["json"]) == scene.meta
        pixels = np.asarray(Image.open(io.BytesIO(sample["png"])))
        assert np.array_equal(pixels, np.asarray(scene.image))


def test_synthetic_shards_read_with_webdataset(synthetic_dir):
    import webdataset as wds

    out, info = synthetic_dir
    urls = [str(out / n) for n in braceexpand.braceexpand(info["shards"])]
    dataset = wds.WebDataset(urls, shardshuffle=False).decode("pil").to_tuple("png", "txt", "json")
    image, caption, meta = next(iter(dataset))
    assert image.size == (64, 64) and caption == synthetic.make_scene(4, 0).caption
    assert meta["index"] == 0


def test_synthetic_idempotent_and_rewrites_on_change(tmp_path):
    info = write_synthetic_shards(tmp_path, 150, max_samples_per_shard=64, progress=False)
    files = [tmp_path / n for n in (*read_sizes(tmp_path), INFO_FILE, SIZES_FILE)]
    stamps = [f.stat().st_mtime_ns for f in files]
    again = write_synthetic_shards(tmp_path, 150, max_samples_per_shard=64, progress=False)
    assert again == info
    assert [f.stat().st_mtime_ns for f in files] == stamps

    changed = write_synthetic_shards(tmp_path, 150, max_samples_per_shard=100, progress=False)
    assert changed["num_shards"] == 2
    # The third shard of the earlier run is gone, so globbing readers see only current data.
    assert sorted(p.name for p in tmp_path.glob("*.tar")) == ["shapes-000000.tar", "shapes-000001.tar"]


def test_synthetic_missing_shard_triggers_rewrite(tmp_path):
    write_synthetic_shards(tmp_path, 20, max_samples_per_shard=8, progress=False)
    (tmp_path / "shapes-000001.tar").unlink()
    info = write_synthetic_shards(tmp_path, 20, max_samples_per_shard=8, progress=False)
    assert (tmp_path / "shapes-000001.tar").is_file() and info["num_samples"] == 20


def test_synthetic_single_group_and_start_index(tmp_path):
    info = write_synthetic_shards(
        tmp_path, 10, seed=1, start_index=1000, single_group=True, prefix="val", progress=False
    )
    assert info["shards"] == "val-{000000..000000}.tar" and info["single_group"] is True
    members = tar_members(tmp_path / "val-000000.tar")
    assert sorted(members) == [f"{i:09d}" for i in range(1000, 1010)]
    for sample in members.values():
        assert json.loads(sample["json"])["label"] in synthetic.class_names()


def test_read_sizes_paths(synthetic_dir, tmp_path):
    out, _ = synthetic_dir
    expected = read_sizes(out)
    assert read_sizes(out / SIZES_FILE) == expected
    assert read_sizes(out / "shapes-000000.tar") == expected
    assert read_sizes(str(out / "shapes-{000000..000004}.tar")) == expected
    with pytest.raises(FileNotFoundError):
        read_sizes(tmp_path)


def test_invalid_synthetic_arguments(tmp_path):
    with pytest.raises(ValueError):
        write_synthetic_shards(tmp_path, 0, progress=False)
    with pytest.raises(ValueError):
        write_synthetic_shards(tmp_path, 5, max_samples_per_shard=0, progress=False)


# ---------------------------------------------------------------- captions files


@pytest.fixture()
def image_folder(tmp_path):
    """A folder with one small image per format, plus a broken file and a BMP (converted to PNG)."""
    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    colors = {"a.png": "red", "b.jpg": "green", "sub/c.webp": "blue", "d.jpeg": "yellow"}
    for name, color in colors.items():
        Image.new("RGB", (8, 6), color).save(root / name)
    (root / "broken.png").write_bytes(b"definitely not a png")
    Image.new("RGB", (4, 4)).save(root / "e.bmp")
    Image.new("RGB", (4, 4), "white").save(tmp_path / "outside.png")
    return root


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, header: list[str], rows: list[list], delimiter=",") -> Path:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_captions_jsonl(image_folder, tmp_path):
    rows = [
        {"image": "a.png", "caption": "a red thing", "id": 7, "tags": ["x", "y"]},
        {"image": "b.jpg", "caption": "  a green thing  "},
        {"image": "sub/c.webp", "caption": "a blue thing", "source": "test"},
        {"image": str(image_folder / "d.jpeg"), "caption": "ein gelbes Ding ü"},
    ]
    captions = write_jsonl(image_folder / "captions.jsonl", rows)
    out = tmp_path / "out"
    info = write_caption_shards(captions, out, max_samples_per_shard=3, progress=False)
    assert (info["num_samples"], info["num_shards"], info["num_rows"]) == (4, 2, 4)
    assert info["source"] == "captions" and info["shards"] == "data-{000000..000001}.tar"
    assert info["skipped"] == dict.fromkeys(SKIP_KINDS, 0)
    assert info["formats"] == {"png": 1, "jpg": 2, "webp": 1}
    assert json.loads((out / INFO_FILE).read_text()) == info
    assert read_sizes(out) == {"data-000000.tar": 3, "data-000001.tar": 1}
    members = all_members(out, info)
    assert set(members["000000000"]) == {"png", "txt", "json"}
    assert json.loads(members["000000000"]["json"]) == {"id": 7, "tags": ["x", "y"]}
    assert members["000000001"]["txt"] == b"a green thing"
    # Original bytes are copied, not re-encoded.
    assert members["000000001"]["jpg"] == (image_folder / "b.jpg").read_bytes()
    assert members["000000002"]["webp"] == (image_folder / "sub/c.webp").read_bytes()
    assert json.loads(members["000000002"]["json"]) == {"source": "test"}
    assert members["000000003"]["txt"].decode("utf-8") == "ein gelbes Ding ü"


@pytest.mark.parametrize("ext,delimiter", [(".csv", ","), (".tsv", "\t")])
def test_captions_csv_custom_columns_and_root(image_folder, tmp_path, ext, delimiter):
    header = ["path", "text", "license"]
    rows = [["a.png", "red, with a comma", "cc-by"], ["sub/c.webp", "blue", "cc0"]]
    captions = write_csv(tmp_path / f"list{ext}", header, rows, delimiter)
    out = tmp_path / "out"
    info = write_caption_shards(
        captions, out, images_root=image_folder, image_key="path", caption_key="text", progress=False
    )
    assert info["num_samples"] == 2 and info["images_root"] == str(image_folder.resolve())
    members = all_members(out, info)
    assert members["000000000"]["txt"] == b"red, with a comma"
    assert json.loads(members["000000000"]["json"]) == {"license": "cc-by"}
    assert json.loads(members["000000001"]["json"]) == {"license": "cc0"}


def test_captions_bad_rows_are_skipped_and_counted(image_folder, tmp_path, caplog):
    rows = [
        {"image": "a.png", "caption": "fine"},
        {"image": "nope.png", "caption": "missing file"},
        {"caption": "no image field"},
        {"image": "b.jpg", "caption": "   "},
        {"image": "b.jpg"},
        {"image": "broken.png", "caption": "garbage bytes"},
        {"image": "../outside.png", "caption": "escapes the root"},
        {"image": str(image_folder.parent / "outside.png"), "caption": "absolute outside"},
        {"image": "e.bmp", "caption": "bitmap"},
        {"image": "sub/c.webp", "caption": "fine too"},
    ]
    captions = write_jsonl(image_folder / "captions.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="vlp.data.caption_files"):
        info = write_caption_shards(captions, tmp_path / "out", progress=False)
    assert info["num_samples"] == 3 and info["num_rows"] == 10
    counts = {"missing_image": 2, "empty_caption": 2, "corrupt_image": 1, "outside_root": 2}
    assert info["skipped"] == {kind: counts.get(kind, 0) for kind in SKIP_KINDS}
    assert json.loads((tmp_path / "out" / INFO_FILE).read_text())["skipped"] == info["skipped"]
    message = caplog.text
    assert "skipped 7 of 10" in message and "line 2: missing_image" in message and "nope.png" in message
    # the BMP is no longer refused: converted to PNG, and counted as such
    assert sorted(all_members(tmp_path / "out", info)) == ["000000000", "000000008", "000000009"]
    assert info["formats"] == {"png": 1, "png (converted from BMP)": 1, "webp": 1} and info["converted"] == 1


def test_captions_allow_outside_root(image_folder, tmp_path):
    captions = write_jsonl(image_folder / "c.jsonl", [{"image": "../outside.png", "caption": "ok"}])
    info = write_caption_shards(captions, tmp_path / "out", allow_outside_root=True, progress=False)
    assert info["num_samples"] == 1 and info["skipped"]["outside_root"] == 0


def test_captions_fatal_errors(image_folder, tmp_path):
    out = tmp_path / "out"
    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ShardError, match="captions file not found: .*missing.jsonl"):
        write_caption_shards(missing, out, progress=False)

    unknown = tmp_path / "captions.txt"
    unknown.write_text("a.png\tred\n")
    with pytest.raises(ShardError, match=r"captions.txt: unknown captions file extension '\.txt'"):
        write_caption_shards(unknown, out, progress=False)

    bad_csv = write_csv(tmp_path / "bad.csv", ["image", "text"], [["a.png", "red"]])
    with pytest.raises(ShardError) as err:
        write_caption_shards(bad_csv, out, images_root=image_folder, progress=False)
    message = str(err.value)
    assert "bad.csv" in message and "'caption'" in message and "['image', 'text']" in message
    assert "\n" not in message

    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"image": "a.png", "caption": "ok"}\n\n{"image": "b.jpg", caption}\n')
    with pytest.raises(ShardError, match=r"bad.jsonl:3: malformed JSON"):
        write_caption_shards(bad_json, out, images_root=image_folder, progress=False)

    not_object = write_jsonl(tmp_path / "list.jsonl", [["a.png", "red"]])
    with pytest.raises(ShardError, match=r"list.jsonl:1: expected a JSON object"):
        write_caption_shards(not_object, out, images_root=image_folder, progress=False)
    # Fatal input errors stop before anything (even the output folder) is written.
    assert not out.exists()


def test_captions_all_rows_bad(image_folder, tmp_path):
    captions = write_jsonl(image_folder / "c.jsonl", [{"image": "nope.png", "caption": "x"}])
    with pytest.raises(ShardError, match="no usable rows"):
        write_caption_shards(captions, tmp_path / "out", progress=False)
    assert not (tmp_path / "out" / INFO_FILE).exists()


def test_synthetic_shards_are_reproducible_and_compact(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 20, seed=9, progress=False)
    b = write_synthetic_shards(tmp_path / "b", 20, seed=9, progress=False)
    assert a == b
    data = (tmp_path / "a" / "shapes-000000.tar").read_bytes()
    assert data == (tmp_path / "b" / "shapes-000000.tar").read_bytes()
    # No per-member PAX headers (they would double the size of small samples).
    assert b"PaxHeader" not in data
