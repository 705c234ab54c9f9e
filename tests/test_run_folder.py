"""Runs never destroy each other: a fresh run refuses a folder holding another run's checkpoints,
``--overwrite`` replaces that run, retention deletes only older checkpoints of the run itself, and
``latest`` always names a complete checkpoint."""

from __future__ import annotations

import pytest

from tests.conftest import run_main
from vlp.checkpoint.writing import Checkpointer, file_sha256, older_to_delete
from vlp.train.logging import read_metrics
from vlp.train.run_folder import config_changes, remove_run_files

pytestmark = pytest.mark.slow


def _train(shards, out, *extra, check=True):
    sets = [
        f"data.train_shards=['{shards['train']}']",
        "data.val_shards=[]",
        "eval.tasks=[]",
        "eval.data=[]",
        "data.batch_size=16",
        "data.workers=0",
        f"train.output_dir={out}",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.checkpoint_every=2",
        "train.keep_checkpoints=1",
        "train.device=cpu",
    ]
    args = ["train", "--config", "configs/demo.yaml", *[a for s in sets for a in ("--set", s)], *extra]
    return run_main(*args, check=check)


def _names(out):
    return sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))


def test_a_fresh_run_refuses_a_folder_with_another_runs_checkpoints(shapes_shards, tmp_path):
    out = tmp_path / "run"
    _train(shapes_shards, out, "--set", "train.steps=6")
    before = {p.name: file_sha256(p) for p in (out / "checkpoints").iterdir() if p.is_file()}
    proc = _train(shapes_shards, out, "--set", "train.steps=2", check=False)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "already holds another run's checkpoints (1: step_00000006.pt)" in errors[0]
    assert "--resume latest" in errors[0] and "--overwrite" in errors[0]
    after = {p.name: file_sha256(p) for p in (out / "checkpoints").iterdir() if p.is_file()}
    assert after == before  # nothing of the other run was touched


def test_overwrite_replaces_the_other_run_and_latest_names_the_new_final_checkpoint(shapes_shards, tmp_path):
    """The reported case: an older run with higher step numbers used to make retention delete the
    new run's own final checkpoint, leaving ``latest`` naming a missing file."""
    out = tmp_path / "run"
    _train(shapes_shards, out, "--set", "train.steps=6")
    (out / "notes.txt").write_text("mine")
    proc = _train(shapes_shards, out, "--set", "train.steps=2", "--overwrite")
    assert _names(out) == ["step_00000002.pt"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002.pt"
    assert "checkpoint " + str(out / "checkpoints" / "step_00000002.pt") in proc.stdout
    # the old run's records (up to step 6) are gone; the user's own file stays
    assert max(r["step"] for r in read_metrics(out / "metrics.jsonl")) == 2
    assert (out / "notes.txt").read_text() == "mine"


def test_resume_latest_continues_and_names_the_config_changes(shapes_shards, tmp_path):
    out = tmp_path / "run"
    _train(shapes_shards, out, "--set", "train.steps=2")
    proc = _train(shapes_shards, out, "--set", "train.steps=4", "--set", "train.lr=3e-4", "--resume", "latest")
    assert "(step 2)" in proc.stdout
    assert "the config differs from the checkpoint's: train.lr: 0.001 -> 0.0003; train.steps: 2 -> 4" in proc.stdout
    assert _names(out) == ["step_00000004.pt"]


def test_resuming_an_earlier_checkpoint_of_the_folder_keeps_the_later_ones(shapes_shards, tmp_path):
    out = tmp_path / "run"
    _train(shapes_shards, out, "--set", "train.steps=6", "--set", "train.keep_checkpoints=3")
    assert _names(out) == ["step_00000002.pt", "step_00000004.pt", "step_00000006.pt"]
    start = out / "checkpoints" / "step_00000002.pt"
    sets = ["--set", "train.steps=3", "--set", "train.checkpoint_every=1", "--set", "train.keep_checkpoints=1"]
    _train(shapes_shards, out, *sets, "--resume", str(start))
    # its own older checkpoint (2) goes; the new one (3) and those it has not reached again (4, 6) stay
    assert _names(out) == ["step_00000003.pt", "step_00000004.pt", "step_00000006.pt"]
    assert (out / "checkpoints" / "latest").read_text() == "step_00000003.pt"


def test_retention_never_deletes_the_checkpoint_just_written_or_a_later_one(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"step": step})
    ck.save(5, {"step": 5})  # a run that went back to an earlier step
    assert [p.name for p in ck.list()] == ["step_00000005.pt", "step_00000020.pt", "step_00000030.pt"]
    assert (tmp_path / "latest").read_text() == "step_00000005.pt"
    paths = [tmp_path / f"step_{s:08d}.pt" for s in (1, 2, 3, 9)]
    assert older_to_delete(paths, 3, keep=2) == paths[:1]
    assert older_to_delete(paths, 3, keep=1) == paths[:2]


def test_overwrite_removes_only_the_run_files(tmp_path):
    ck = tmp_path / "checkpoints"
    ck.mkdir()
    for name in ("step_00000002.pt", "step_00000002.pt.sha256", "step_00000004.pt.tmp", "latest", "my_notes.txt"):
        (ck / name).write_text("x")
    (ck / "step_00000006").mkdir()  # a DeepSpeed step folder
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "tensorboard").mkdir()
    (tmp_path / "report.json").write_text("{}")
    remove_run_files(tmp_path)
    assert sorted(p.name for p in ck.iterdir()) == ["my_notes.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints", "report.json"]


def test_config_changes_lists_nested_keys_and_ignores_the_resume_keys():
    saved = {"train": {"lr": 1e-3, "resume": "", "overwrite": False}, "data": {"batch_size": 16}}
    now = {"train": {"lr": 3e-4, "resume": "latest", "overwrite": True}, "data": {"batch_size": 16}}
    assert config_changes(saved, now) == ["train.lr: 0.001 -> 0.0003"]
