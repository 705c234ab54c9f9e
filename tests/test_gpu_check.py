"""tools/gpu_check.py: ``--dry`` runs every part at toy sizes on the CPU and writes one sane JSON;
a part that fails (an out-of-memory error included) is recorded and the others still run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from tools import gpu_check  # noqa: E402


@pytest.mark.slow
def test_dry_run_measures_every_part(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "VLP_BENCH_CACHE": str(tmp_path / "cache")}
    cmd = [sys.executable, "tools/gpu_check.py", "--dry", "--out", str(out), "--work", str(tmp_path / "work")]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    parts = report["parts"]
    assert report["dry"] and report["device"] == "cpu" and list(parts) == list(gpu_check.PARTS)
    assert all(p["status"] == "ok" for p in parts.values()), {k: p["status"] for k, p in parts.items()}
    assert all(p["seconds"] >= 0 for p in parts.values())

    assert 0 < parts["peak"]["tflops"] < 100 and parts["peak"]["dtype"] == "bfloat16"
    step = parts["train_step"]
    assert step["precision"] == "bf16" and step["vlp_samples_per_s"] > 0 and step["open_clip_samples_per_s"] > 0
    assert step["ratio"] == pytest.approx(step["vlp_samples_per_s"] / step["open_clip_samples_per_s"])
    assert step["peak_tflops"] == pytest.approx(parts["peak"]["tflops"], rel=1e-4)  # MFU against the measured peak
    assert 0 < step["vlp_mfu"] < 1 and 0 < step["open_clip_mfu"] < 1

    loss = parts["loss"]
    assert set(loss["impls"]) == {"vlp gather", "vlp tiled", "open_clip"} and loss["global_batch"] == 512
    for impl, row in loss["impls"].items():
        assert row["status"] == "ok" and row["ms"] > 0 and row["peak_mib"] >= 0, impl
    assert loss["impls"]["vlp tiled"]["agree"] and loss["open_clip_over_tiled_time"] > 0

    data = parts["data"]
    assert data["loader_images_per_s"]["vlp workers=0"] > 0 and data["open_clip_left_out"] == "--no-peer"
    on_device = data["on_device"]
    assert on_device["status"] == "ok" and on_device["images_per_s"] > 0 and on_device["normalised_on"] == "cpu"
    assert -3 < on_device["input_mean"] < 3  # normalised, not 0-255 pixels

    ev = parts["eval"]
    assert ev["vlp_images_per_s"] > 0 and ev["clip_benchmark_images_per_s"] > 0 and ev["agree"]

    run = parts["train_run"]
    assert run["process_group"] == "gloo" and run["precision"] == "bf16" and run["steps"] == 12
    assert run["loss_fell"] and run["last_losses_mean"] < run["first_losses_mean"] and run["checkpoint_loads"]
    for name in gpu_check.PARTS:  # the short table
        assert name in proc.stdout
    assert (tmp_path / "work" / "logs" / "loss.log").read_text().strip()  # the benchmark's own report


def test_failed_part_is_recorded_and_the_rest_run(tmp_path, monkeypatch, capsys):
    def out_of_memory(ctx):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 16.00 GiB")

    def broken(ctx):
        raise RuntimeError("no open_clip_train here")

    def fine(ctx):
        return {"status": "ok", "tflops": 1.5, "n": 8, "dtype": "bfloat16", "device": "cpu"}

    monkeypatch.setitem(gpu_check.PART_FNS, "loss", out_of_memory)
    monkeypatch.setitem(gpu_check.PART_FNS, "eval", broken)
    monkeypatch.setitem(gpu_check.PART_FNS, "peak", fine)
    report = gpu_check.run(["loss", "eval", "peak"], True, tmp_path / "r.json", tmp_path / "work")
    parts = json.loads((tmp_path / "r.json").read_text())["parts"]
    assert parts == report["parts"]
    assert parts["loss"]["status"] == "OOM"
    assert parts["eval"]["status"].startswith("error: RuntimeError: no open_clip_train") and parts["eval"]["traceback"]
    assert parts["peak"]["status"] == "ok" and parts["peak"]["tflops"] == 1.5
    table = capsys.readouterr().out
    assert "OOM" in table and "FAILED" in table and "1.5 TFLOP/s" in table


def test_summary_shows_an_out_of_memory_loss():
    parts = {
        "loss": {
            "status": "ok",
            "seconds": 12.0,
            "global_batch": 65536,
            "impls": {
                "vlp tiled": {"status": "ok", "ms": 310.0, "peak_mib": 420.0},
                "open_clip": {"status": "OOM", "ms": None, "peak_mib": None},
            },
        }
    }
    (row,) = gpu_check.summary_rows(parts)
    assert row["what"] == "N=65536: vlp tiled 310 ms 420 MiB; open_clip OOM"
