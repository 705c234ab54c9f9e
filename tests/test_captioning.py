"""Captioning evaluation: COCO's BLEU-4 / CIDEr-D on hand-computed cases, the JSONL layout, the
``captioning`` task and the ``vlp caption`` command through the real CLI."""

from __future__ import annotations

import json
import math
import sys

import pytest
from PIL import Image

from tests.conftest import run_main
from vlp.eval.captioning import MissingDependencyError, caption_scores, normalize_caption
from vlp.eval.datasets import EvalDataError
from vlp.eval.registry import load_eval_data


def test_normalize_caption_lowercases_and_drops_punctuation():
    assert normalize_caption("  A red-haired Dog's toy, on the MAT!  ") == "a red haired dog s toy on the mat"
    assert normalize_caption("...") == ""


def test_bleu4_corpus_counts_by_hand():
    """Clipped n-gram matches summed over the corpus (image 1 / image 2):
    1-grams 5/6 ("a" twice, once in the reference) + 3/3, 2-grams 3/5 + 2/2, 3-grams 2/4 + 1/1,
    4-grams 1/3 + 0/0; candidate and closest reference lengths both 6 + 3: no brevity penalty."""
    candidates = ["A red circle, on a table.", "two blue squares"]
    references = [["a red circle on the table"], ["Two blue squares", "two squares"]]
    expected = (8 / 9 * 5 / 7 * 3 / 5 * 1 / 3) ** (1 / 4)
    assert caption_scores(candidates, references)["bleu4"] == pytest.approx(expected, abs=1e-6)


def test_bleu4_brevity_penalty_uses_the_closest_reference():
    """Every n-gram matches; 4 words against the closest reference length 6 (not 8)."""
    score = caption_scores(["a red circle on"], [["a red circle on the table", "a red circle on a big wooden table"]])
    assert score["bleu4"] == pytest.approx(math.exp(1 - 6 / 4), abs=1e-6)


def test_cider_d_by_hand():
    """Two images whose references share no n-gram: every idf is log(2), so tf-idf cosines are
    plain count cosines. Image 1: n=1..4 cosines 3/sqrt(3*5), 2/sqrt(2*4), 1/sqrt(1*3), 0;
    length penalty exp(-(3-5)^2 / (2*6^2)); x10. Image 2 equals its reference: 10."""
    candidates = ["a red circle", "two blue squares here"]
    references = [["a red circle on grass"], ["two blue squares here"]]
    cosines = [3 / math.sqrt(15), 2 / math.sqrt(8), 1 / math.sqrt(3), 0.0]
    image1 = sum(cosines) / 4 * math.exp(-(2**2) / (2 * 6**2)) * 10
    assert caption_scores(candidates, references)["cider"] == pytest.approx((image1 + 10) / 2, abs=1e-6)


def test_cider_weighs_ngrams_by_the_reference_corpus():
    """An n-gram in the references of every image carries no information (idf 0)."""
    same = caption_scores(["a red circle on grass"] * 2, [["a red circle on grass"]] * 2)
    assert same["cider"] == pytest.approx(0.0, abs=1e-9) and same["bleu4"] == pytest.approx(1.0, abs=1e-6)


def test_identical_captions_score_bleu4_one_and_empty_ones_zero():
    refs = [["a red circle on green grass"], ["two blue squares next to a star"]]
    perfect = caption_scores([r[0] for r in refs], refs)
    assert perfect["bleu4"] == pytest.approx(1.0, abs=1e-6) and perfect["cider"] == pytest.approx(10.0, abs=1e-6)
    assert caption_scores(["", ""], refs) == pytest.approx({"bleu4": 0.0, "cider": 0.0}, abs=1e-9)
    assert caption_scores(["", refs[1][0]], refs)["bleu4"] < 1


def test_caption_scores_errors(monkeypatch):
    with pytest.raises(ValueError, match="no captions"):
        caption_scores([], [])
    with pytest.raises(ValueError, match="1 candidates but 2"):
        caption_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="at least one reference"):
        caption_scores(["a"], [[]])
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # as if not installed
    with pytest.raises(MissingDependencyError, match="pip install pycocoevalcap"):
        caption_scores(["a"], [["a"]])


def write_layout(root, *, extra_rows=()) -> tuple:
    """3 readable images with references, a missing one, a corrupt one, a blank-caption row."""
    (root / "img" / "sub").mkdir(parents=True)
    names = ["img/red.png", "img/blue.png", "img/sub/green.png"]
    for name, color in zip(names, ("red", "blue", "green")):
        Image.new("RGB", (64, 64), color).save(root / name)
    (root / "img" / "broken.png").write_bytes(b"not a png")
    rows = [
        {"image": names[0], "captions": ["a red square", "red"]},
        {"image": names[1], "caption": "a blue square"},
        {"image": str(root / names[2]), "captions": ["a green square", "  "]},
        {"image": "img/missing.png", "captions": ["nothing"]},
        {"image": "img/broken.png", "captions": ["broken"]},
        {"image": names[0], "captions": ["   "]},
        *extra_rows,
    ]
    path = root / "refs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path, names


def test_jsonl_layout_skips_and_counts_bad_rows(tmp_path):
    path, _ = write_layout(tmp_path)
    data = load_eval_data("captioning", path)
    assert len(data.images) == 4 and data.skipped == {"missing_image": 1, "empty_caption": 1}
    assert data.captions == ["a red square", "red", "a blue square", "a green square", "broken"]
    assert data.text_to_image == [0, 0, 1, 2, 3]
    (tmp_path / "bad.jsonl").write_text('{"image": "img/red.png", "captions": "not a list"}\n')
    with pytest.raises(EvalDataError, match="bad.jsonl:1: field 'captions' must be a list of str"):
        load_eval_data("captioning", tmp_path / "bad.jsonl")


@pytest.mark.slow
def test_captioning_task_through_vlp_eval(tmp_path):
    path, names = write_layout(tmp_path)
    out = tmp_path / "res.json"
    args = ["eval", "--task", "captioning", "--data", path, "--model", "coca_debug", "--output", out]
    proc = run_main(*args, "--workers", "0", "--batch-size", "2")
    assert "bleu4" in proc.stdout and "cider" in proc.stdout and f"results in {out}" in proc.stdout
    result = json.loads(out.read_text())
    metrics = result["metrics"]
    assert result["task"] == "captioning" and set(metrics) == {"bleu4", "cider", "num_images", "examples"}
    assert metrics["num_images"] == 3 and 0 <= metrics["bleu4"] <= 1 and metrics["cider"] >= 0
    assert result["skipped"] == {"missing_image": 1, "empty_caption": 1, "corrupt_image": 1}
    examples = metrics["examples"]
    assert [e["image"] for e in examples] == [str(tmp_path / n) for n in names]
    assert examples[0]["references"] == ["a red square", "red"] and all(isinstance(e["caption"], str) for e in examples)

    clip = run_main("eval", "--task", "captioning", "--data", path, "--model", "debug", "--output", out, check=False)
    assert clip.returncode == 2 and "no text decoder: captioning needs a CoCa model" in clip.stderr


@pytest.mark.slow
def test_vlp_caption_command(tmp_path):
    _, names = write_layout(tmp_path)
    out = tmp_path / "out" / "captions.json"
    proc = run_main("caption", "--model", "coca_debug", "--images", tmp_path / "img", "--output", out, "--workers", "0")
    found = sorted(str(tmp_path / n) for n in names)  # the folder's images, sorted, recursively
    lines = [line.split("\t") for line in proc.stdout.splitlines() if "\t" in line]
    assert [path for path, _ in lines] == found
    assert f"skipped {tmp_path / 'img' / 'broken.png'} (corrupt_image)" in proc.stderr
    assert "skipped 1 unreadable image(s): {'corrupt_image': 1}" in proc.stderr
    assert f"3 caption(s) in {out}" in proc.stdout
    rows = json.loads(out.read_text())
    assert [r["image"] for r in rows] == found and [r["caption"] for r in rows] == [c for _, c in lines]

    pattern = str(tmp_path / "img" / "*.png")  # a glob: the top folder only, the broken file included
    greedy = run_main("caption", "--model", "coca_debug", "--images", pattern, "--strategy", "greedy", "--output", out)
    assert len([line for line in greedy.stdout.splitlines() if "\t" in line]) == 2

    clip = run_main("caption", "--model", "debug", "--images", tmp_path / "img", "--output", out, check=False)
    assert clip.returncode == 2 and "no text decoder: captioning needs a CoCa model" in clip.stderr
    none = run_main("caption", "--model", "coca_debug", "--images", tmp_path / "nothing*.png", check=False)
    assert none.returncode == 2 and "no image files matching" in none.stderr


def test_eval_without_pycocoevalcap_fails_before_generating(tmp_path, monkeypatch, capsys):
    from vlp.cli import main

    path, _ = write_layout(tmp_path)
    monkeypatch.setitem(sys.modules, "pycocoevalcap.bleu.bleu", None)  # as if not installed
    monkeypatch.setattr("vlp.models.generate.generate_captions", None)  # generating would crash
    args = ["eval", "--task", "captioning", "--data", str(path), "--model", "coca_debug", "--workers", "0"]
    assert main([*args, "--output", str(tmp_path / "res.json")]) == 2
    assert "captioning metrics need pycocoevalcap" in capsys.readouterr().err


@pytest.mark.slow
def test_two_processes_caption_like_one(tmp_path):
    """Images sharded over 2 gloo ranks, captions gathered: the single-process result."""
    import os
    import subprocess

    import torch

    from tests.conftest import REPO
    from tests.distributed import torchrun_cmd
    from vlp.models.registry import build_model

    torch.manual_seed(0)
    model, _, _ = build_model("coca_debug")
    torch.nn.init.normal_(model.text_decoder.text_projection, std=model.text_decoder.width**-0.5)
    ckpt = tmp_path / "coca.pt"
    torch.save(model.state_dict(), ckpt)
    path, _ = write_layout(tmp_path)
    args = ["--task", "captioning", "--data", path, "--model", "coca_debug", "--checkpoint", ckpt, "--workers", "0"]
    run_main("eval", *args, "--output", tmp_path / "one.json")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = torchrun_cmd("vlp.eval", [*args, "--output", tmp_path / "two.json"])
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one, two = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("one", "two"))
    assert one["metrics"] == two["metrics"] and one["skipped"] == two["skipped"]
    assert len({e["caption"] for e in one["metrics"]["examples"]}) > 1  # a real model, not uniform logits
