"""Experiment tracking in Weights & Biases (``train.report_to: [wandb]``), in W&B's offline mode: a real
training run writes real W&B run files, which the test reads back record by record and compares with
metrics.jsonl; a preempted run resumed with ``--resume latest`` logs on to the same W&B run."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from tests.conftest import REPO, run_main
from vlp.config import ConfigError, TrainConfig, load_config
from vlp.train.guards import EXIT_PREEMPTED
from vlp.train.logging import read_metrics
from vlp.train.tracking import TRACKERS

wandb_pb = pytest.importorskip("wandb.proto.wandb_internal_pb2", reason="wandb is in the dev extra")

BLOCK = 32 * 1024  # the record log's block size (LevelDB's log format)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def wandb_records(run_folder: Path) -> list:
    """The protobuf records of ``run_folder/run-<id>.wandb``: a 7-byte file header (``:W&B``, magic,
    version), then LevelDB-log chunks (crc32, length, kind) that never cross a 32 KiB block; a record
    is one FULL chunk or FIRST, MIDDLE..., LAST; a block's tail shorter than a chunk header is padding."""
    (path,) = run_folder.glob("run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B", path
    records, pos, parts = [], 7, b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 or pos + 7 + length > len(data):  # the end of what is written so far
            break
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (FULL, LAST):
            record = wandb_pb.Record()
            record.ParseFromString(parts)
            records.append(record)
            parts = b""
    return records


def closed_run_records(run_folder: Path, timeout: float = 60.0) -> list:
    """The records of a finished run, once all are on disk: W&B's service process writes the file in
    32 KiB blocks, the last when it closes the run, which can be after the training process returned."""
    deadline = time.time() + timeout
    while not of_kind(records := wandb_records(run_folder), "exit") and time.time() < deadline:
        time.sleep(0.2)
    return records


def of_kind(records, kind: str) -> list:
    return [getattr(r, kind) for r in records if r.WhichOneof("record_type") == kind]


def history_rows(records) -> dict[int, dict]:
    """The run's logged rows by step (``_step``), without W&B's own ``_runtime``/``_timestamp``."""
    rows = {}
    for h in of_kind(records, "history"):
        row = {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in h.item}
        rows[row.pop("_step")] = {k: v for k, v in row.items() if not k.startswith("_")}
    return rows


def _sets(shards, out, *extra):
    base = [
        f"data.train_shards=['{shards['train']}']",
        f"data.val_shards=['{shards['val']}']",
        "eval.tasks=[zeroshot_retrieval]",
        "eval.data=[]",
        "data.batch_size=16",
        "data.workers=0",
        f"train.output_dir={out}",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.checkpoint_every=0",
        "train.device=cpu",
        "train.report_to=[wandb]",
        "train.wandb.project=vlp-tests",
        "train.wandb.tags=[ci,offline]",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", *[a for s in base for a in ("--set", s)]]


@pytest.fixture()
def wandb_offline(tmp_path, monkeypatch) -> Path:
    """W&B offline, its settings and caches in ``tmp_path``; returns the folder for ``WANDB_DIR``."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var, sub in (("WANDB_CONFIG_DIR", "config"), ("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data")):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home" / sub))
    monkeypatch.delenv("WANDB_DIR", raising=False)
    (tmp_path / "wandb-dir").mkdir()
    return tmp_path / "wandb-dir"


def test_report_to_choices_are_the_trackers():
    (item,) = typing.get_args(typing.get_type_hints(TrainConfig)["report_to"])
    assert set(typing.get_args(item)) == set(TRACKERS)
    assert load_config(None, ["train.report_to=wandb"]).train.report_to == ["wandb"]
    assert load_config(None, ["train.report_to=[]"]).train.report_to == []
    assert load_config(None).train.report_to == ["tensorboard"]  # as before
    with pytest.raises(ConfigError, match=r"train.report_to\[1\].*one of 'tensorboard', 'wandb'.*'mlflow'"):
        load_config(None, ["train.report_to=[wandb,mlflow]"])


def test_wandb_not_installed_is_one_line_at_start_up(shapes_shards, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    out = tmp_path / "run"
    proc = run_main("train", *_sets(shapes_shards, out, "train.steps=2"), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert "wandb is not installed" in line and "pip install 'vlp[wandb]'" in line
    assert not out.exists()  # before the model was built or the run folder written


@pytest.mark.slow
def test_offline_run_files_hold_the_metrics_and_resume_continues_the_run(shapes_shards, tmp_path, wandb_offline):
    import torch

    out = tmp_path / "run"
    # 1. a run stopped by SIGTERM (preemption); its W&B files go where WANDB_DIR says
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "WANDB_DIR": str(wandb_offline)}
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_sets(shapes_shards, out, "train.steps=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not (out / "metrics.jsonl").is_file():
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stdout + stderr
    assert not (out / "tensorboard").exists()  # report_to names only wandb
    (first,) = (wandb_offline / "wandb").glob("offline-run-*")
    run_id = first.name.rsplit("-", 1)[-1]
    latest = out / "checkpoints" / (out / "checkpoints" / "latest").read_text()
    step = torch.load(latest, weights_only=True)["step"]
    assert torch.load(latest, weights_only=True)["tracking"] == {"wandb_run_id": run_id}

    # 2. resumed: the same W&B run (id) goes on; by default its files go to the run folder's wandb/
    resumed = run_main("train", *_sets(shapes_shards, out, f"train.steps={step + 2}"), "--resume", "latest")
    assert f"(step {step})" in resumed.stdout
    (second,) = (out / "wandb").glob("offline-run-*")
    assert second.name.endswith(f"-{run_id}")

    a, b = closed_run_records(first), closed_run_records(second)
    assert [r.run_id for r in of_kind(a, "run") + of_kind(b, "run")] == [run_id, run_id]
    (run,) = of_kind(a, "run")
    assert run.project == "vlp-tests" and run.display_name == "run" and list(run.tags) == ["ci", "offline"]
    config = {u.key: json.loads(u.value_json) for u in run.config.update}  # the resolved config
    assert config["train"]["report_to"] == ["wandb"] and config["model"]["name"] == "debug"
    assert of_kind(a, "preempting") and [e.exit_code for e in of_kind(a, "exit")] == [EXIT_PREEMPTED]
    assert not of_kind(b, "preempting") and [e.exit_code for e in of_kind(b, "exit")] == [0]

    # every record of metrics.jsonl, with the same values at the same step, across the two W&B files
    rows_a, rows_b = history_rows(a), history_rows(b)
    assert max(rows_a) == step and sorted(rows_b) == [step + 1, step + 2]
    rows = {**rows_a, **rows_b}
    records = read_metrics(out / "metrics.jsonl")
    assert sorted({r["step"] for r in records}) == sorted(rows)
    for record in records:
        row = rows[record["step"]]
        for key, value in record.items():
            if key != "step":
                assert row[key] == value, (record["step"], key, row.get(key), value)
    logged = set().union(*rows.values())
    assert {"loss", "lr", "samples_per_s", "logit_scale", "eval/zeroshot_retrieval/image_retrieval_recall@1"} <= logged
