"""Evaluation data layouts (vlp.eval.datasets) and the synthetic export (vlp.eval.synthetic_layouts)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader

from tests.conftest import png_bytes, write_tar
from vlp.data import synthetic
from vlp.data.shards import write_synthetic_shards
from vlp.eval.datasets import (
    EvalDataError,
    ImageList,
    load_classification,
    load_classnames,
    load_retrieval,
    load_templates,
)
from vlp.eval.registry import load_eval_data
from vlp.eval.synthetic_layouts import describes, export_eval_layouts, negatives, size_flags, size_swap
from vlp.eval.tar_index import TarSlice
from vlp.eval.tasks.compositional import load_compositional
from vlp.eval.tasks.counting import find_number, load_counting


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def image_folder(root: Path) -> Path:
    """cat: 2 images, dog_house: 1 image, plus a non-image file that must be ignored."""
    for name, n in (("cat", 2), ("dog_house", 1)):
        (root / name).mkdir(parents=True)
        for i in range(n):
            (root / name / f"{i}.png").write_bytes(png_bytes())
    (root / "cat" / "notes.txt").write_text("not an image")
    return root


def to_tensor(image):
    return torch.zeros(3, 8, 8) + image.size[0]


# ---------------------------------------------------------------- classification


def test_image_folder_classnames_from_folders(tmp_path):
    data = load_classification(image_folder(tmp_path / "pets"))
    assert data.classnames == ["cat", "dog house"]
    assert data.labels == [0, 0, 1]
    assert all(isinstance(p, str) and Path(p).is_absolute() for p in data.images)
    assert data.name == "pets" and data.templates is None and data.skipped == {}


def test_image_folder_classnames_file_and_mismatch(tmp_path):
    root = image_folder(tmp_path / "pets")
    names = tmp_path / "names.txt"
    names.write_text("a cat\na dog house\n\n")
    assert load_classification(root, classnames=names).classnames == ["a cat", "a dog house"]
    names.write_text("a cat\n")
    with pytest.raises(EvalDataError, match=r"names\.txt") as err:
        load_classification(root, classnames=str(names))
    assert "2 class folders but 1 class names" in str(err.value)
    with pytest.raises(EvalDataError, match="the classnames list"):
        load_classification(root, classnames=["a", "b", "c"])


def test_imagenet_classnames_and_templates():
    assert len(load_classnames("imagenet")) == 1000
    assert len(load_templates("imagenet")) == 80
    simple = load_templates("imagenet-simple")
    assert len(simple) == 7 and all(isinstance(t("dog"), str) for t in simple)


def test_template_file_errors_name_file_and_line(tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a photo of {c}.\n\nart of {c}\n")
    assert load_templates(good) == ["a photo of {c}.", "art of {c}"]
    bad = tmp_path / "bad.txt"
    bad.write_text("a photo of {c}.\na photo of a thing\n")
    with pytest.raises(EvalDataError, match=r"bad\.txt:2: .*no '\{c\}'"):
        load_templates(bad)
    bad.write_text("{c} and {x}\n")
    with pytest.raises(EvalDataError, match=r"bad\.txt:1: .*other than"):
        load_templates(str(bad))
    with pytest.raises(EvalDataError, match=r"templates\[1\]"):
        load_templates(["{c}", "nothing"])
    with pytest.raises(EvalDataError, match="missing.txt"):
        load_templates(tmp_path / "missing.txt")


def test_classification_shards(tmp_path):
    info = write_synthetic_shards(tmp_path / "val", 12, start_index=10**7, single_group=True, progress=False)
    pattern = str(tmp_path / "val" / info["shards"])
    data = load_classification(pattern)  # class names and templates from _info.json
    # local shards are indexed: each image is where its bytes are, read when it is encoded
    assert len(data.images) == 12 and all(isinstance(b, TarSlice) for b in data.images)
    with tarfile.open(data.images[0].path) as tar:
        first = next(m for m in tar if m.name.endswith((".jpg", ".png", ".webp")))
        assert data.images[0].read() == tar.extractfile(first).read()
    assert data.classnames == synthetic.zeroshot_classnames() and data.templates == list(synthetic.ZEROSHOT_TEMPLATES)
    assert data.labels == [synthetic.make_scene(0, 10**7 + i, single_group=True).meta["cls"] for i in range(12)]
    assert data.name == "val"
    # a ``cls`` member, an unlabelled sample, and a label beyond the class names
    samples = [{"__key__": "a", "png": png_bytes(), "cls": b"3"}, {"__key__": "b", "png": png_bytes()}]
    shard = write_tar(tmp_path / "cls.tar", samples)
    data = load_classification(shard, classnames="imagenet")
    assert data.labels == [3] and data.skipped == {"missing_label": 1}
    with pytest.raises(EvalDataError, match=r"cls\.tar#a: label 3 outside the 2 class names"):
        load_classification(str(shard), classnames=["x", "y"])
    with pytest.raises(EvalDataError, match="class names needed"):
        load_classification(str(shard))


# ---------------------------------------------------------------- retrieval


def test_retrieval_jsonl_missing_image_counted(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png"):
        (tmp_path / "img" / name).write_bytes(png_bytes())
    rows = [
        {"image": "img/a.png", "captions": ["one", " two "]},
        {"image": "img/missing.png", "captions": ["gone"]},
        {"image": str(tmp_path / "img" / "b.png"), "caption": "three"},
    ]
    data = load_retrieval(write_jsonl(tmp_path / "ret.jsonl", rows))
    assert data.images == [str(tmp_path / "img" / "a.png"), str(tmp_path / "img" / "b.png")]
    assert data.captions == ["one", "two", "three"] and data.text_to_image == [0, 0, 1]
    assert data.skipped == {"missing_image": 1} and data.name == "ret"
    with pytest.raises(EvalDataError, match=r"bad\.jsonl:2: malformed JSON"):
        load_retrieval(write_jsonl(tmp_path / "bad.jsonl", [rows[0], "{not json"]))
    with pytest.raises(EvalDataError, match=r"bad2\.jsonl:1: field 'captions'"):
        load_retrieval(write_jsonl(tmp_path / "bad2.jsonl", [{"image": "img/a.png", "captions": "x"}]))


def test_retrieval_shards(tmp_path):
    samples = [
        {"__key__": "a", "png": png_bytes(), "txt": b"a red square"},
        {"__key__": "b", "jpg": png_bytes(), "json": json.dumps({"captions": ["x", "y"]}).encode()},
        {"__key__": "c", "png": png_bytes()},
        {"__key__": "d", "txt": b"no image"},
    ]
    data = load_eval_data("retrieval", str(write_tar(tmp_path / "r.tar", samples)))
    assert data.captions == ["a red square", "x", "y"] and data.text_to_image == [0, 1, 1]
    assert all(isinstance(b, TarSlice) for b in data.images)
    assert data.skipped == {"missing_caption": 1, "missing_image": 1}


def test_text_files_not_utf8_name_file_line_and_fix(tmp_path):
    # Excel's cp1252: class names, templates, JSONL and SugarCrepe JSON each stop with file:line, not a traceback
    names = tmp_path / "names.txt"
    names.write_bytes("cat\ncaf\u00e9 au lait\n".encode("cp1252"))
    with pytest.raises(EvalDataError, match=r"names\.txt:2: not valid utf-8 \(byte 0xe9 at column 4\); save the file"):
        load_classnames(names)
    with pytest.raises(EvalDataError, match=r"names\.txt:2: not valid utf-8"):
        load_templates(names)
    (tmp_path / "a.png").write_bytes(png_bytes())
    ret = tmp_path / "ret.jsonl"
    ret.write_bytes(b'{"image": "a.png", "caption": "ok"}\n{"image": "a.png", "caption": "\x93quoted\x94"}\n')
    with pytest.raises(EvalDataError, match=r"ret\.jsonl:2: not valid utf-8 \(byte 0x93 at column 32\)"):
        load_retrieval(ret)
    sugar = tmp_path / "swap_att.json"
    sugar.write_bytes('{"0": {"filename": "a.png", "caption": "caf\u00e9", "negative_caption": "x"}}'.encode("cp1252"))
    with pytest.raises(EvalDataError, match=r"swap_att\.json:1: not valid utf-8"):
        load_compositional(sugar, images_root=tmp_path)


def test_text_files_with_bom_and_crlf(tmp_path):
    names = tmp_path / "names.txt"
    names.write_bytes("caf\u00e9\r\ndog\r\n".encode("utf-16"))  # Notepad's "Unicode"
    assert load_classnames(names) == ["caf\u00e9", "dog"]
    (tmp_path / "a.png").write_bytes(png_bytes())
    rows = [{"image": "a.png", "captions": ["one"]}, {"image": "a.png", "caption": "caf\u00e9"}]
    (tmp_path / "ret.jsonl").write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\r\n" for r in rows).encode())
    assert load_retrieval(tmp_path / "ret.jsonl").captions == ["one", "caf\u00e9"]


# ---------------------------------------------------------------- compositional and counting


def test_compositional_jsonl_and_sugarcrepe(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes())
    rows = [
        {"image": "x.png", "positive": "p", "negatives": ["n1", "n2"], "type": "swap"},
        {"image": "x.png", "positive": "q", "negative": "m"},
        {"image": "gone.png", "positive": "r", "negatives": ["s"]},
    ]
    data = load_compositional(write_jsonl(tmp_path / "comp.jsonl", rows))
    assert data.positives == ["p", "q"] and data.negatives == [["n1", "n2"], ["m"]]
    assert data.types == ["swap", None] and data.skipped == {"missing_image": 1}
    images = tmp_path / "coco"
    images.mkdir()
    (images / "1.jpg").write_bytes(png_bytes())
    sugar = {"0": {"filename": "1.jpg", "caption": "a dog", "negative_caption": "a cat"}}
    sugar["1"] = {"filename": "2.jpg", "caption": "b", "negative_caption": "c"}
    (tmp_path / "swap_att.json").write_text(json.dumps(sugar))
    data = load_eval_data("compositional", tmp_path / "swap_att.json", images_root=images)
    assert data.images == [str(images / "1.jpg")] and data.types == ["swap_att"]
    assert data.positives == ["a dog"] and data.negatives == [["a cat"]] and data.skipped == {"missing_image": 1}
    (tmp_path / "broken.json").write_text(json.dumps({"0": {"filename": "1.jpg", "caption": "a"}}))
    with pytest.raises(EvalDataError, match=r"broken\.json\['0'\]: field 'negative_caption'"):
        load_compositional(tmp_path / "broken.json")


def test_find_number():
    assert find_number("Three red circles", 3) == (0, 5)
    assert find_number("a photo of 10 dogs", 10) == (11, 13)
    assert find_number("13 dogs and a 3rd cat", 3) is None
    assert find_number("threes", 3) is None
    assert find_number("two", True) is None and find_number("one dog", 1) is None


def test_counting_skips_counted(tmp_path):
    (tmp_path / "x.png").write_bytes(png_bytes())
    rows = [
        {"image": "x.png", "caption": "three red circles", "count": 3},
        {"image": "x.png", "caption": "4 dogs", "count": 4},
        {"image": "x.png", "caption": "one dog", "count": 1},
        {"image": "x.png", "caption": "eleven dogs", "count": 11},
        {"image": "x.png", "caption": "3 dogs", "count": "3"},
        {"image": "x.png", "caption": "red circles", "count": 3},
        {"image": "x.png", "caption": "five dogs", "count": 4},
        {"image": "gone.png", "caption": "two dogs", "count": 2},
    ]
    data = load_counting(write_jsonl(tmp_path / "count.jsonl", rows))
    assert data.counts == [3, 4] and data.captions == ["three red circles", "4 dogs"]
    assert data.skipped == {"bad_count": 3, "caption_without_number": 2, "missing_image": 1}


def test_load_eval_data_errors(tmp_path):
    with pytest.raises(EvalDataError, match="unknown eval task"):
        load_eval_data("nope", tmp_path)
    with pytest.raises(EvalDataError, match="not found"):
        load_eval_data("counting", tmp_path / "none.jsonl")
    with pytest.raises(EvalDataError, match="shard file not found"):
        load_eval_data("zeroshot_classification", str(tmp_path / "s-{0..1}.tar"), classnames=["a"])
    write_jsonl(tmp_path / "all_bad.jsonl", [{"image": "gone.png", "caption": "two", "count": 2}])
    with pytest.raises(EvalDataError, match="no usable samples"):
        load_counting(tmp_path / "all_bad.jsonl")


# ---------------------------------------------------------------- ImageList


@pytest.mark.parametrize("workers", [0, 2])
def test_image_list_reports_failures_in_batches(tmp_path, workers):
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes((16, 16)))
    (tmp_path / "corrupt.png").write_bytes(b"\x89PNG not really")
    images = [str(good), str(tmp_path / "missing.png"), str(tmp_path / "corrupt.png"), png_bytes((20, 20)), b""]
    loader = DataLoader(ImageList(images, to_tensor), batch_size=2, num_workers=workers, collate_fn=ImageList.collate)
    indices, failed = [], {}
    for idx, batch, fails in loader:
        assert batch.shape[0] == len(idx)
        indices += idx.tolist()
        failed.update(fails)
    assert indices == [0, 3]
    assert failed == {1: "missing_image", 2: "corrupt_image", 4: "corrupt_image"}
    assert ImageList([png_bytes((40, 40))], to_tensor, max_pixels=100)[0] == (0, None, "image_too_large")
    idx, batch, fails = ImageList.collate([(7, None, "missing_image")])
    assert idx.tolist() == [] and batch.numel() == 0 and fails == [(7, "missing_image")]


# ---------------------------------------------------------------- synthetic export


def test_export_eval_layouts_loads_and_is_idempotent(tmp_path):
    paths = export_eval_layouts(tmp_path / "eval", num_images=60, progress=False)
    assert set(paths) == {"zeroshot_classification", "zeroshot_retrieval", "compositional", "counting"}
    cls = load_eval_data("zeroshot_classification", paths["zeroshot_classification"])
    plural = dict(zip(synthetic.class_names(), synthetic.zeroshot_classnames()))
    folders = sorted(label.replace(" ", "_") for label in plural)
    assert len(cls.images) == 60 and cls.classnames[0] == "blue circles" and len(cls.classnames) == 36
    for path, label in zip(cls.images, cls.labels):  # label = folder index; class name = plural of it
        assert Path(path).parent.name == folders[label]
        assert cls.classnames[label] == plural[folders[label].replace("_", " ")]
    assert cls.templates == list(synthetic.ZEROSHOT_TEMPLATES)
    ret = load_eval_data("retrieval", paths["zeroshot_retrieval"])
    assert len(ret.images) == 60 and ret.text_to_image == [i // 2 for i in range(120)]
    assert all(ret.captions[2 * i] != ret.captions[2 * i + 1] for i in range(60))
    comp = load_eval_data("compositional", paths["compositional"])
    assert len(comp.images) == 240 and comp.types[:3] == ["swap_attribute", "replace_attribute", "replace_object"]
    assert comp.types[180:] == ["swap_size"] * 60 and len(set(comp.images[180:]) & set(comp.images[:180])) == 0
    assert all(neg[0] != pos for neg, pos in zip(comp.negatives, comp.positives))
    count = load_eval_data("counting", paths["counting"])
    assert len(count.images) == 60 and set(count.counts) <= set(range(2, 7)) and count.skipped == {}
    for path in count.images[:5]:  # caption and count come from the scene of that image
        scene = synthetic.make_scene(0, int(Path(path).stem), single_group=True)
        assert scene.meta["groups"][0]["count"] == count.counts[count.images.index(path)]
    mtime = (tmp_path / "eval" / "counting.jsonl").stat().st_mtime_ns
    assert export_eval_layouts(tmp_path / "eval", num_images=60, progress=False) == paths
    assert (tmp_path / "eval" / "counting.jsonl").stat().st_mtime_ns == mtime
    export_eval_layouts(tmp_path / "eval", num_images=20, progress=False)  # smaller: no stale images
    assert len(load_eval_data("zeroshot_classification", paths["zeroshot_classification"]).images) == 20


def test_size_swap_swaps_only_the_size_words_and_is_false_of_the_image():
    made = 0
    for index in range(400):
        scene = synthetic.make_scene(3, index)
        groups, negative = scene.meta["groups"], size_swap(scene)
        assert synthetic.drawable(groups)  # the rule holds of every scene the generator draws
        a, b = groups if len(groups) == 2 else (groups[0], groups[0])
        swapped = [{**a, "size": b["size"]}, {**b, "size": a["size"]}]
        if negative is None:  # not two groups, one size, a size word left out, or a swap no image could have
            named_both = all(size_flags(groups, scene.caption))
            assert a is b or a["size"] == b["size"] or not named_both or not synthetic.drawable(swapped)
            continue
        made += 1
        exchanged = [{"small": "large", "large": "small"}.get(w, w) for w in scene.caption.split()]
        assert negative.split() == exchanged  # the positive's words, with its two size words exchanged
        assert not describes(swapped, (True, True), groups) and describes(groups, (True, True), groups)
        assert synthetic.drawable(swapped)
    assert made >= 10
    a = {"shape": "circle", "color": "red", "size": "small", "count": 2}
    b = {"shape": "star", "color": "blue", "size": "large", "count": 1}
    scene = synthetic.Scene(None, "two small red circles and a large blue star", {"groups": [a, b], "index": 0})
    assert size_swap(scene) == "two large red circles and a small blue star"
    scene = synthetic.Scene(None, "two small red circles and a blue star", {"groups": [a, b], "index": 0})
    assert size_swap(scene) is None
    # four large circles: more than a large group ever holds, so the text alone would show it false
    a = {**a, "count": synthetic.MAX_LARGE_PER_GROUP + 1}
    scene = synthetic.Scene(None, "four small red circles and a large blue star", {"groups": [a, b], "index": 0})
    assert size_swap(scene) is None and not synthetic.drawable([{**a, "size": "large"}, {**b, "size": "small"}])


def test_compositional_negatives_are_false_of_the_image():
    made = 0
    for index in range(40):
        scene = synthetic.make_scene(3, index)
        negs = negatives(scene, 3)
        groups = scene.meta["groups"]
        if negs is None:
            # only one group, or a colour swap that leaves the scene's description true
            a, b = groups if len(groups) == 2 else (groups[0], groups[0])
            assert a is b or a["color"] == b["color"] or a["shape"] == b["shape"]
            continue
        made += 1
        assert set(negs) == {"swap_attribute", "replace_attribute", "replace_object"}
        assert scene.caption not in negs.values()
        assert describes(groups, size_flags(groups, scene.caption), groups)
    assert made >= 10
    # swapping the colours of two same-shape, same-count groups describes the same image: no set
    a = {"shape": "circle", "color": "red", "size": "small", "count": 1}
    b = {**a, "color": "blue"}
    scene = synthetic.Scene(image=None, caption="a red circle and a blue circle", meta={"groups": [a, b], "index": 0})
    assert negatives(scene, 0) is None


def test_config_lists_naming_imagenet_mean_what_the_cli_names_mean(tmp_path):
    """``eval.classnames: [imagenet]`` / ``eval.templates: [imagenet]`` in a training config are
    ``--classnames imagenet`` / ``--templates imagenet``, and a one-file list is that file."""
    from vlp.eval.datasets import load_classnames, load_templates

    assert load_classnames(["imagenet"]) == load_classnames("imagenet") and len(load_classnames(["imagenet"])) == 1000
    assert len(load_templates(["imagenet"])) == 80 and len(load_templates(["imagenet-simple"])) == 7
    names = tmp_path / "names.txt"
    names.write_text("cat\ndog\n")
    assert load_classnames([str(names)]) == ["cat", "dog"]
    assert load_classnames(["imagenet", "cat"]) == ["imagenet", "cat"]  # two entries: class names as given
    assert load_templates(["a photo of a {c}."]) == ["a photo of a {c}."]
