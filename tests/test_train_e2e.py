"""End to end through the real CLI on shards made in the test: train, torchrun, resume, bad data, demo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import pytest

from tests.conftest import REPO, run_cli, run_main
from tests.distributed import torchrun_cmd
from vlp.train.logging import read_metrics

pytestmark = pytest.mark.slow


def _sets(shards, out, *extra):
    base = [
        f"data.train_shards=['{shards['train']}']",
        f"data.val_shards=['{shards['val']}']",
        "data.batch_size=16",
        "data.workers=1",
        "data.shuffle_buffer=64",
        f"train.output_dir={out}",
        "train.steps=6",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=3",
        "train.eval_every=0",
        "eval.data=[]",
        "eval.tasks=[zeroshot_classification,zeroshot_retrieval]",
        *extra,
    ]
    return [a for s in base for a in ("--set", s)]


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_train_writes_run_folder(shapes_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", "--config", "configs/demo.yaml", *_sets(shapes_shards, out, "train.lr=3e-4"))
    assert f"outputs in {out}" in proc.stdout
    assert (out / "config.yaml").is_file() and "lr: 0.0003" in (out / "config.yaml").read_text()
    assert sorted(p.name for p in (out / "checkpoints").glob("step_*.pt")) == ["step_00000003.pt", "step_00000006.pt"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000006.pt"
    assert any(p.name.startswith("events") for p in (out / "tensorboard").iterdir())
    records = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6]
    final = [r for r in records if "eval/zeroshot_retrieval/image_retrieval_recall@1" in r]
    assert final and final[-1]["step"] == 6 and final[-1]["eval/zeroshot_classification/num_samples"] == 64


def test_resume_matches_uninterrupted_run(shapes_shards, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_cli("train", "--config", "configs/demo.yaml", *_sets(shapes_shards, full))
    # a run killed after its step-3 checkpoint: the same folder without what came later
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000003.pt")
    proc = run_main("train", "--config", "configs/demo.yaml", *_sets(shapes_shards, cut), "--resume", "latest")
    assert "resumed from" in proc.stdout and "(step 3)" in proc.stdout
    a, b = _losses(full), _losses(cut)
    assert sorted(b) == [1, 2, 3, 4, 5, 6]  # no duplicate records from before the kill
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)


def test_resume_from_other_architecture_is_a_clear_error(shapes_shards, tmp_path):
    out = tmp_path / "run"
    run_main("train", "--config", "configs/demo.yaml", *_sets(shapes_shards, out, "train.steps=3"))
    proc = run_main(
        "train",
        "--config",
        "configs/demo.yaml",
        *_sets(shapes_shards, out, "model.name=ViT-S-32", "train.steps=4"),
        "--resume",
        "latest",
        check=False,
    )
    assert proc.returncode == 2 and "model.name='debug'" in proc.stderr and "ViT-S-32" in proc.stderr


def test_torchrun_two_processes_gloo(shapes_shards, tmp_path):
    """The trainer under DDP; every loss implementation's multi-rank equality is in test_losses.py."""
    out = tmp_path / "ddp"
    sets = _sets(shapes_shards, out, "train.steps=4", "loss.contrastive.impl=gather")
    cmd = torchrun_cmd("vlp.train", ["--config", "configs/demo.yaml", *sets])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = read_metrics(out / "metrics.jsonl")  # written by rank 0 only
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4]
    ckpt = out / "checkpoints" / "step_00000004.pt"
    import torch

    state = torch.load(ckpt, weights_only=True)
    assert state["world"] == 2 and len(state["data"]) == 2 and len(state["rng"]) == 2


def test_bad_data_run_completes_and_reports(bad_shards, tmp_path):
    out = tmp_path / "bad"
    sets = [
        f"data.train_shards=['{bad_shards['pattern']}']",
        "data.val_shards=[]",
        "eval.data=[]",
        "data.workers=0",
        "data.batch_size=4",
        "data.max_image_pixels=40000",
        f"train.output_dir={out}",
        "train.steps=12",
        "train.log_every=4",
        "train.checkpoint_every=0",
    ]
    proc = run_main("train", "--config", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)])
    assert "skipped bad data" in proc.stdout
    last = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r][-1]
    for kind in (
        "shard_error",
        "missing_image",
        "corrupt_image",
        "image_too_large",
        "missing_caption",
        "empty_caption",
        "bad_caption_encoding",
    ):
        assert last.get(f"data/skipped/{kind}", 0) >= 1, (kind, last)


def test_config_error_exits_2_with_one_line(tmp_path):
    proc = run_cli("train", "--config", "configs/demo.yaml", "--set", "train.lrr=1", check=False)
    assert proc.returncode == 2
    assert (
        proc.stderr.strip().splitlines() == [proc.stderr.strip().splitlines()[0]]
        and "unknown key 'train.lrr'" in proc.stderr
    )


def test_demo_reduced_steps_beats_chance(demo_data, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "data").symlink_to(demo_data)  # the shards `vlp demo` would make, made once per session
    proc = run_main(
        "demo", "--out", out, "--steps", "150", "--set", "train.eval_every=0", "--set", "train.checkpoint_every=0"
    )
    report = json.loads((out / "report.json").read_text())
    assert report["zeroshot_acc1"] >= 2 * report["zeroshot_chance"], report
    assert report["retrieval_t2i_r1"] >= 5 * report["retrieval_chance_r1"], report
    assert (out / "report.png").stat().st_size > 10_000
    assert os.path.isfile(report["checkpoint"]) and report["train_seconds"] > 0
    assert f"report in {out / 'report.json'}" in proc.stdout


@pytest.mark.parametrize(
    "precision, accum, extra",
    [
        ("bf16", 1, []),
        ("fp32", 2, ["loss.contrastive.impl=tiled", "loss.contrastive.tile_size=5", "loss.uniform_weight=0.1"]),
        ("fp32", 2, ["model.name=debug-siglip", "loss.contrastive.type=siglip", "loss.contrastive.impl=ring"]),
    ],
    ids=["bf16", "tiled-accum-uniform", "siglip-accum"],
)
def test_trainer_in_process_precision_and_accumulation(shapes_shards, tmp_path, precision, accum, extra):
    """bf16 autocast on CPU, exact accumulation and the loss options through the real Trainer."""
    from vlp.config import load_config
    from vlp.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.train_shards=['{shapes_shards['train']}']",
            "data.val_shards=[]",
            "eval.data=[]",
            "data.workers=0",
            "data.batch_size=8",
            f"model.precision={precision}",
            f"train.accum_steps={accum}",
            f"train.output_dir={tmp_path}",
            "train.steps=3",
            "train.log_every=1",
            "train.checkpoint_every=0",
        ],
    )
    summary = Trainer(cfg).train()
    losses = [r["loss"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses)
    assert summary["step"] == 3 and os.path.isfile(summary["checkpoint"])


def test_group_size_must_divide_world_size_at_start(tmp_path):
    from vlp.config import ConfigError, load_config
    from vlp.distributed import DistEnv
    from vlp.train.trainer import Trainer

    cfg = load_config(
        None, ["loss.contrastive.impl=grouped", "loss.contrastive.group_size=3", f"train.output_dir={tmp_path}"]
    )
    with pytest.raises(ConfigError, match="group_size=3 does not divide the world size 2"):
        Trainer(cfg, env=DistEnv(rank=0, world=2))
    assert not any(tmp_path.iterdir())  # nothing written


def test_coca_demo_reports_caption_accuracy(demo_data, tmp_path):
    """`vlp demo --config configs/demo_coca.yaml`, a few steps: the report has the caption metrics."""
    out = tmp_path / "coca"
    out.mkdir()
    (out / "data").symlink_to(demo_data)
    sets = ["--set", "train.eval_every=0", "--set", "train.checkpoint_every=0", "--set", "data.batch_size=32"]
    proc = run_main("demo", "--config", "configs/demo_coca.yaml", "--out", out, "--steps", "20", *sets)
    report = json.loads((out / "report.json").read_text())
    for key in ("caption_names_shape", "caption_names_colour", "caption_names_both"):
        assert 0 <= report[key] <= 1, (key, report)
    assert report["caption_shape_chance"] == pytest.approx(1 / 6) and report["caption_num_images"] == 500
    rows = json.loads((out / "captions.json").read_text())
    assert len(rows) == 500 and {"colour", "shape", "caption"} <= set(rows[0])
    assert "caption: shape" in proc.stdout
