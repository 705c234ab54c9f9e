"""`vlp eval` end to end: every task on the built-in layouts, CLIP_benchmark-equal numbers on a
random ViT-B-32 saved as a bare state dict, and 2 gloo processes equal to one."""

from __future__ import annotations

import builtins
import json
import os
import subprocess

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

from tests.clip_benchmark_ref import assert_equals_clip_benchmark
from tests.conftest import REPO, run_main
from tests.distributed import torchrun_cmd

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def layouts(tmp_path_factory):
    from tests.test_linear_probe import write_probe_layout
    from vlp.eval.synthetic_layouts import export_eval_layouts

    root = tmp_path_factory.mktemp("layouts")
    paths = export_eval_layouts(root, num_images=40, progress=False)
    return {**paths, "linear_probe": str(write_probe_layout(root / "linear_probe", n_train=4, n_test=2))}


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory):
    from vlp.models.registry import build_model

    torch.manual_seed(0)
    model, _, _ = build_model("debug")
    path = tmp_path_factory.mktemp("ckpt") / "debug.pt"
    torch.save(model.state_dict(), path)
    return path


def _eval_args(layouts, ckpt, out):
    args = ["eval", "--model", "debug", "--checkpoint", ckpt, "--output", out, "--workers", "0", "--plots"]
    for task, path in layouts.items():
        args += ["--task", task, "--data", path]
    return args


def test_every_task_through_the_cli(layouts, debug_ckpt, tmp_path):
    out = tmp_path / "res.json"
    proc = run_main(*_eval_args(layouts, debug_ckpt, out))
    assert f"results in {out}" in proc.stdout and "acc1" in proc.stdout
    results = json.loads(out.read_text())
    assert [r["task"] for r in results] == list(layouts)
    for r in results:
        assert set(r) >= {"dataset", "model", "pretrained", "task", "metrics"} and r["model"] == "debug"
    by_task = {r["task"]: r["metrics"] for r in results}
    assert by_task["zeroshot_classification"]["num_classes"] == 36
    assert 0 <= by_task["zeroshot_retrieval"]["image_retrieval_recall@1"] <= 1
    assert {"acc_swap_attribute", "acc_replace_attribute", "acc_replace_object"} <= set(by_task["compositional"])
    counting = by_task["counting"]
    assert np.asarray(counting["confusion_matrix"]).sum() == counting["num_samples"]
    assert os.path.getsize(counting["confusion_png"]) > 5000
    probe = by_task["linear_probe"]
    assert (probe["n_train"], probe["n_test"]) == (24, 12) and 0 <= probe["mean_per_class_recall"] <= 1


def test_two_processes_equal_one(layouts, debug_ckpt, tmp_path):
    one = tmp_path / "one.json"
    run_main(*_eval_args(layouts, debug_ckpt, one))
    two = tmp_path / "two.json"
    cmd = torchrun_cmd("vlp.eval", _eval_args(layouts, debug_ckpt, two)[1:])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    a, b = json.loads(one.read_text()), json.loads(two.read_text())
    for ra, rb in zip(a, b):
        for k, v in ra["metrics"].items():
            if isinstance(v, float):
                assert v == pytest.approx(rb["metrics"][k], abs=1e-6), (ra["task"], k)
            elif k != "confusion_png":
                assert v == rb["metrics"][k], (ra["task"], k)


def test_unknown_task_and_missing_data_exit_2(debug_ckpt, tmp_path):
    proc = run_main("eval", "--task", "zeroshot", "--data", tmp_path, "--model", "debug", check=False)
    assert proc.returncode == 2 and "unknown eval task 'zeroshot'" in proc.stderr
    proc = run_main("eval", "--task", "counting", "--data", tmp_path / "nope.jsonl", "--model", "debug", check=False)
    assert proc.returncode == 2 and "nope.jsonl" in proc.stderr


def _image_folder(root, n_per_class=3):
    g = np.random.default_rng(0)
    classes = ["cat", "dog", "fish", "bird", "frog", "tree"]
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n_per_class):
            Image.fromarray(g.integers(0, 255, (40, 50, 3), dtype=np.uint8)).save(root / c / f"{i}.png")
    return classes


def test_vit_b_32_state_dict_matches_clip_benchmark(tmp_path, monkeypatch):
    """Acceptance: a random ViT-B-32 saved with torch.save(state_dict) gives CLIP_benchmark's numbers."""
    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    # clip-benchmark 1.6.2 calls float() on a 1-element array, which numpy >= 2.4 rejects
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms("ViT-B-32")
    model.eval()
    ckpt = tmp_path / "vitb32.pt"
    torch.save(model.state_dict(), ckpt)
    classes = _image_folder(tmp_path / "folder")
    rows = [
        # one caption per image so both sides encode texts in the same batch shapes (bit-identical
        # features: an untrained model's scores nearly tie); multi-caption recall is compared on
        # shared features in test_eval_metrics.py
        {"image": f"folder/{c}/{i}.png", "captions": [f"a photo of a {c} number {i}"]}
        for c in classes
        for i in range(3)
    ]
    (tmp_path / "ret.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = ["a photo of a {c}.", "itap of a {c}.", "a bad photo of the {c}."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "ours.json"
    run_main(
        "eval",
        "--model",
        "ViT-B-32",
        "--checkpoint",
        ckpt,
        "--task",
        "zeroshot_classification",
        "--data",
        tmp_path / "folder",
        "--templates",
        tmp_path / "templates.txt",
        "--task",
        "zeroshot_retrieval",
        "--data",
        tmp_path / "ret.jsonl",
        "--output",
        out,
        "--workers",
        "0",
        "--batch-size",
        "6",
    )
    ours = {r["task"]: r["metrics"] for r in json.loads(out.read_text())}

    tok = open_clip.get_tokenizer("ViT-B-32")
    assert_equals_clip_benchmark(ours, model, preprocess, tok, tmp_path, rows, templates)
