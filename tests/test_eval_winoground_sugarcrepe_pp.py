"""SugarCrepe++ and Winoground (vlp/eval/tasks/sugarcrepe_pp.py, winoground.py): their released
layouts read, and their scores equal to values worked out by hand for features the test chooses.

The model is a stub: an image's feature is picked by its colour (the preprocess keeps the top-left
pixel), a caption's by the caption itself (the captions are the names of the vectors below), so
every cosine similarity is known. Comparisons are strict, as in both papers' code: a tie is a miss.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.conftest import png_bytes, run_main
from vlp.distributed import DistEnv
from vlp.eval.datasets import EvalDataError
from vlp.eval.registry import EvalContext, get_task, load_eval_data

# unit vectors; their cosines: X.A .8  X.B .6  X.C .6  Y.A .6  Y.B .8  Y.C 0  A.B .96  A.C .48  B.C .36
VECTORS = {
    "X": (1.0, 0.0, 0.0),
    "Y": (0.0, 1.0, 0.0),
    "A": (0.8, 0.6, 0.0),
    "B": (0.6, 0.8, 0.0),
    "C": (0.6, 0.0, 0.8),
}
COLOURS = {"red": ((200, 30, 30), "X"), "green": ((30, 200, 30), "Y"), "blue": ((30, 30, 200), "B")}
COLOURS["yellow"] = ((200, 200, 30), "C")


class StubModel(torch.nn.Module):
    """``encode_image``: the vector of the image's colour; ``encode_text``: the vector named by the
    caption (token = its index in VECTORS)."""

    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.preprocess_cfg = {}  # for the start-up line of `vlp eval`
        self.names = list(VECTORS)
        self.text_table = torch.tensor([VECTORS[n] for n in self.names])
        self.by_colour = {rgb: torch.tensor(VECTORS[name]) for rgb, name in COLOURS.values()}

    def encode_image(self, pixels_B3):
        return torch.stack([self.by_colour[tuple(int(v) for v in pixel)] for pixel in pixels_B3])

    def encode_text(self, tokens_B):
        return self.text_table[tokens_B]

    def tokenize(self, texts):
        return torch.tensor([self.names.index(t) for t in texts])


def top_left_pixel(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


def write_png(path: Path, colour: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(png_bytes(size=(8, 8), color=COLOURS[colour][0]))


def score(task: str, path: Path, **options) -> tuple[dict, dict]:
    """(metrics, skipped) of ``task`` on ``path`` with the stub model, through the python API."""
    data = load_eval_data(task, path, **options)
    model = StubModel()
    ctx = EvalContext(env=DistEnv(), preprocess=top_left_pixel, batch_size=3)
    return get_task(task).run(model, model.tokenize, data, ctx), data.skipped


def score_cli(task: str, path: Path, tmp_path: Path, monkeypatch, *options) -> dict:
    """The JSON `vlp eval --task TASK --data PATH` writes, the stub model standing in for --model."""
    model = StubModel()
    monkeypatch.setattr("vlp.api.load_model", lambda *a, **kw: (model, top_left_pixel, model.tokenize))
    out = tmp_path / f"{task}.json"
    run_main("eval", "--model", "debug", "--task", task, "--data", path, *options,
             "--output", out, "--workers", "0", "--device", "cpu", "--batch-size", "3")  # fmt: skip
    return json.loads(out.read_text())


# ---------------------------------------------------------------- SugarCrepe++

# (image colour, caption, caption2, negative_caption); hand-worked cosines (image.p1, image.p2,
# image.neg | p1.p2, p1.neg, p2.neg), ITT = both image.p > image.neg, TOT = p1.p2 above both others
SWAP_ATT = [
    ("red", "X", "A", "Y"),  # 1, .8, 0 | .8, 0, .6          ITT yes  TOT yes
    ("red", "A", "B", "X"),  # .8, .6, 1 | .96, .8, .6       ITT no   TOT yes
    ("red", "X", "B", "C"),  # 1, .6, .6 | .6, .6, .36       ITT no (tie)  TOT no (tie)
]
REPLACE_REL = [
    ("red", "X", "B", "Y"),  # 1, .6, 0 | .6, 0, .8          ITT yes  TOT no (p1.p2 < p2.neg only)
    ("green", "B", "Y", "X"),  # .8, 1, 0 | .8, .6, 0        ITT yes  TOT yes
    ("green", "Y", "C", "B"),  # 1, 0, .8 | 0, .8, .36       ITT no (p2 only)  TOT no
    ("green", "C", "Y", "A"),  # 0, 1, .6 | 0, .48, .6       ITT no (p1 only)  TOT no
]
SUGARCREPE_PP_EXPECTED = {
    "itt_acc": 3 / 7,
    "tot_acc": 3 / 7,
    "itt_p1_acc": 5 / 7,  # misses: rows 2 (.8 < 1) and 7 (0 < .6)
    "itt_p2_acc": 4 / 7,  # misses: rows 2, 3 (the tie) and 6
    "num_samples": 7,
    "itt_acc_replace_rel": 2 / 4,
    "tot_acc_replace_rel": 1 / 4,
    "itt_acc_swap_att": 1 / 3,
    "tot_acc_swap_att": 2 / 3,
}


def write_sugarcrepe_pp(root: Path) -> tuple[Path, Path]:
    """SugarCrepe++'s release layout: data/<type>.json (a list of entries) and the images apart
    (COCO val2017 in the release); swap_att.json has one entry whose image is missing."""
    data, images = root / "data", root / "val2017"
    data.mkdir(parents=True)
    for name, rows in (("swap_att", SWAP_ATT), ("replace_rel", REPLACE_REL)):
        entries = []
        for i, (colour, p1, p2, neg) in enumerate(rows):
            filename = f"{name}_{i:012d}.jpg"
            write_png(images / filename, colour)  # PNG bytes under a .jpg name: decoded by content
            entries.append({"id": i, "filename": filename, "caption": p1, "caption2": p2, "negative_caption": neg})
        if name == "swap_att":
            entries.append({"id": 3, "filename": "000000999999.jpg", "caption": "X", "caption2": "X",
                            "negative_caption": "Y"})  # fmt: skip
        (data / f"{name}.json").write_text(json.dumps(entries, indent=1))
    return data, images


def test_sugarcrepe_pp_scores_equal_hand_computed_values(tmp_path):
    data, images = write_sugarcrepe_pp(tmp_path)
    metrics, skipped = score("sugarcrepe_pp", data, images_root=images)
    assert metrics == pytest.approx(SUGARCREPE_PP_EXPECTED, abs=1e-9)
    assert set(metrics) == set(SUGARCREPE_PP_EXPECTED) and skipped == {"missing_image": 1}
    # one file: its rows only, its stem as the type
    metrics, skipped = score("sugarcrepe_pp", data / "replace_rel.json", images_root=images)
    assert metrics == pytest.approx(
        {"itt_acc": 2 / 4, "tot_acc": 1 / 4, "itt_p1_acc": 3 / 4, "itt_p2_acc": 3 / 4, "num_samples": 4,
         "itt_acc_replace_rel": 2 / 4, "tot_acc_replace_rel": 1 / 4}, abs=1e-9)  # fmt: skip
    assert skipped == {}


def test_sugarcrepe_pp_through_vlp_eval(tmp_path, monkeypatch):
    data, images = write_sugarcrepe_pp(tmp_path)
    result = score_cli("sugarcrepe_pp", data, tmp_path, monkeypatch, "--images-root", images)
    assert result["task"] == "sugarcrepe_pp" and result["dataset"] == "data"
    assert result["metrics"] == pytest.approx(SUGARCREPE_PP_EXPECTED, abs=1e-9)
    assert result["skipped"] == {"missing_image": 1}


def test_sugarcrepe_pp_loader(tmp_path):
    data, images = write_sugarcrepe_pp(tmp_path)
    loaded = load_eval_data("sugarcrepe_pp", data, images_root=images)
    assert loaded.name == "data" and len(loaded.images) == 7  # replace_rel.json first: sorted by name
    assert loaded.images[0] == str(images / "replace_rel_000000000000.jpg")
    assert loaded.captions[:2] == ["X", "B"] and loaded.text_to_image[:4] == [0, 0, 1, 1]
    assert loaded.negatives[:2] == [["Y"], ["X"]] and loaded.types == ["replace_rel"] * 4 + ["swap_att"] * 3
    # SugarCrepe's {id: entry} object is read too; a missing field names the file and entry
    entry = {"filename": str(images / "swap_att_000000000000.jpg"), "caption": "X", "caption2": "A"}
    (tmp_path / "one.json").write_text(json.dumps({"7": {**entry, "negative_caption": "Y"}}))
    assert load_eval_data("sugarcrepe_pp", tmp_path / "one.json").types == ["one"]
    (tmp_path / "bad.json").write_text(json.dumps([{"filename": "a.jpg", "caption": "X", "negative_caption": "Y"}]))
    with pytest.raises(EvalDataError, match=r"bad\.json\[0\]: field 'caption2' must be a str"):
        load_eval_data("sugarcrepe_pp", tmp_path / "bad.json")
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(EvalDataError, match=r"broken\.json: cannot read SugarCrepe\+\+ JSON"):
        load_eval_data("sugarcrepe_pp", tmp_path / "broken.json")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EvalDataError, match=r"empty: no \.json files"):
        load_eval_data("sugarcrepe_pp", tmp_path / "empty")
    with pytest.raises(EvalDataError, match=r"no usable samples; skipped: \{'missing_image': 4\}"):
        load_eval_data("sugarcrepe_pp", data / "replace_rel.json", images_root=tmp_path / "elsewhere")


# ---------------------------------------------------------------- Winoground

# (image_0, image_1, caption_0, caption_1, collapsed_tag); hand-worked cosines
# s(c0,i0), s(c1,i0), s(c0,i1), s(c1,i1); text = s(c0,i0) > s(c1,i0) and s(c1,i1) > s(c0,i1),
# image = s(c0,i0) > s(c0,i1) and s(c1,i1) > s(c1,i0), group = both
WINOGROUND = [
    ("red", "green", "A", "B", "Object"),  # .8, .6, .6, .8     text yes  image yes  group yes
    ("red", "green", "B", "Y", "Relation"),  # .6, 0, .8, 1     text yes  image no   group no
    ("blue", "green", "X", "Y", "Relation"),  # .6, .8, 0, 1    text no   image yes  group no
    ("red", "yellow", "B", "C", "Object"),  # .6, .6, .36, 1    text no (tie)  image yes  group no
    ("blue", "yellow", "X", "C", "Both"),  # .6, .36, .6, 1     text yes  image no (tie)  group no
    ("red", "green", "Y", "X", "Relation"),  # 0, 1, 1, 0       text no   image no   group no
    ("green", "red", "Y", "X", "Both"),  # 1, 0, 0, 1           text yes  image yes  group yes
    ("red", "green", "B", "Y", "Relation"),  # as the second    text yes  image no   group no
]
WINOGROUND_EXPECTED = {
    "text_score": 5 / 8,
    "image_score": 4 / 8,
    "group_score": 2 / 8,
    "num_samples": 8,
    "text_score_both": 2 / 2,
    "image_score_both": 1 / 2,
    "group_score_both": 1 / 2,
    "text_score_object": 1 / 2,
    "image_score_object": 2 / 2,
    "group_score_object": 1 / 2,
    "text_score_relation": 2 / 4,
    "image_score_relation": 1 / 4,
    "group_score_relation": 0 / 4,
}


def write_winoground(root: Path) -> Path:
    """Winoground's release layout: examples.jsonl (image names without extension) and images/*.png;
    plus an example whose image_1 is missing and one whose image_0 is no image (corrupt)."""
    rows = []
    for i, (colour0, colour1, c0, c1, tag) in enumerate(WINOGROUND):
        write_png(root / "images" / f"ex_{i}_img_0.png", colour0)
        write_png(root / "images" / f"ex_{i}_img_1.png", colour1)
        row = {"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": c0, "caption_1": c1}
        rows.append({**row, "tag": "Noun", "secondary_tag": "", "num_main_preds": 1, "collapsed_tag": tag})
    write_png(root / "images" / "ex_8_img_0.png", "red")  # ex_8_img_1 is missing
    (root / "images" / "ex_9_img_0.png").write_bytes(b"\x89PNG not really")
    write_png(root / "images" / "ex_9_img_1.png", "green")
    for i in (8, 9):
        rows.append({"id": i, "image_0": f"ex_{i}_img_0", "image_1": f"ex_{i}_img_1", "caption_0": "X",
                     "caption_1": "Y", "collapsed_tag": "Object"})  # fmt: skip
    (root / "examples.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    return root


def test_winoground_scores_equal_hand_computed_values(tmp_path):
    root = write_winoground(tmp_path / "winoground")
    metrics, skipped = score("winoground", root)
    assert metrics == pytest.approx(WINOGROUND_EXPECTED, abs=1e-9)
    assert set(metrics) == set(WINOGROUND_EXPECTED)
    # the missing image drops its example when read; the corrupt one drops its example when encoded
    assert skipped == {"missing_image": 1, "corrupt_image": 1}


def test_winoground_through_vlp_eval(tmp_path, monkeypatch):
    root = write_winoground(tmp_path / "winoground")
    result = score_cli("winoground", root / "examples.jsonl", tmp_path, monkeypatch)
    assert result["task"] == "winoground" and result["dataset"] == "examples"
    assert result["metrics"] == pytest.approx(WINOGROUND_EXPECTED, abs=1e-9)
    assert result["skipped"] == {"missing_image": 1, "corrupt_image": 1}


def test_winoground_loader(tmp_path):
    root = write_winoground(tmp_path / "winoground")
    data = load_eval_data("winoground", root)
    assert data.name == "winoground" and len(data.images) == 2 * 9  # the example with a missing image left out
    assert data.images[:2] == [str(root / "images" / "ex_0_img_0.png"), str(root / "images" / "ex_0_img_1.png")]
    assert data.captions[:4] == ["A", "B", "B", "Y"] and data.text_to_image == list(range(18))
    assert data.types[:4] == ["Object", "Object", "Relation", "Relation"]
    # the dataset repository's layout (data/examples.jsonl, data/images/); images elsewhere; other extensions
    repo = tmp_path / "repo"
    (repo / "data").mkdir(parents=True)
    row = {"id": 0, "image_0": "a", "image_1": "b.png", "caption_0": "X", "caption_1": "Y"}
    (repo / "data" / "examples.jsonl").write_text(json.dumps(row) + "\n")
    write_png(tmp_path / "pictures" / "b.png", "green")
    Image.new("RGB", (8, 8), COLOURS["red"][0]).save(tmp_path / "pictures" / "a.jpg", format="JPEG")
    data = load_eval_data("winoground", repo, images_root=tmp_path / "pictures")
    assert data.images == [str(tmp_path / "pictures" / "a.jpg"), str(tmp_path / "pictures" / "b.png")]
    assert data.types == [None, None]
    with pytest.raises(EvalDataError, match=r"no usable samples; skipped: \{'missing_image': 1\}"):
        load_eval_data("winoground", repo)  # data/images/ does not exist
    (repo / "data" / "examples.jsonl").write_text(json.dumps({**row, "caption_1": 3}) + "\n")
    with pytest.raises(EvalDataError, match=r"examples\.jsonl:1: field 'caption_1' must be a str"):
        load_eval_data("winoground", repo, images_root=tmp_path / "pictures")
    with pytest.raises(EvalDataError, match=r"pictures: no examples\.jsonl"):
        load_eval_data("winoground", tmp_path / "pictures")
