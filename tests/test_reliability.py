"""Faults the trainer survives, each injected for real: SIGTERM (preemption), SIGKILL in the middle
of a checkpoint write, non-finite losses, a rank that dies, and invalid configs that must fail
before any data is read. Faults are injected through a ``sitecustomize.py`` on PYTHONPATH."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.conftest import REPO, run_cli, run_main
from tests.distributed import free_port
from vlp.train.guards import EXIT_PREEMPTED
from vlp.train.logging import read_metrics

pytestmark = pytest.mark.slow

# installed into the child process: hooks chosen by environment variables
HOOKS = textwrap.dedent(
    """
    import os, signal

    if os.environ.get("VLP_FAULT_KILL_IN_SAVE"):
        import torch

        n_save = int(os.environ["VLP_FAULT_KILL_IN_SAVE"])
        real_save, calls = torch.save, [0]

        def save(obj, f, *a, **k):
            calls[0] += 1
            if calls[0] == n_save:  # write half a checkpoint, then die as from SIGKILL
                f.write(b"PK\\x03\\x04 half a zip")
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            return real_save(obj, f, *a, **k)

        torch.save = save

    if os.environ.get("VLP_FAULT_NAN_CALLS"):
        import vlp.losses.objective as objective

        bad = {int(x) for x in os.environ["VLP_FAULT_NAN_CALLS"].split(",")}
        real_call, count = objective.Objective.__call__, [0]

        def call(self, out, group=None):
            count[0] += 1
            loss, terms = real_call(self, out, group)
            return (loss * float("nan"), terms) if count[0] in bad else (loss, terms)

        objective.Objective.__call__ = call

    if os.environ.get("VLP_FAULT_DIE_AT_STEP") and os.environ.get("RANK") == "1":
        import vlp.train.trainer as trainer

        die_at, real_step = int(os.environ["VLP_FAULT_DIE_AT_STEP"]), trainer.Trainer.train_step

        def train_step(self, micro):
            if self.step + 1 == die_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real_step(self, micro)

        trainer.Trainer.train_step = train_step
    """
)


def _env(tmp_path, **faults):
    hooks = tmp_path / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    return {"PYTHONPATH": f"{hooks}{os.pathsep}{REPO}", "OMP_NUM_THREADS": "1", **faults}


def _sets(shards, out, *extra):
    base = [
        f"data.train_shards=['{shards['train']}']",
        "data.val_shards=[]",
        "eval.data=[]",
        "eval.tasks=[]",
        "data.batch_size=16",
        "data.workers=0",
        f"train.output_dir={out}",
        "train.steps=6",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.device=cpu",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", *[a for s in base for a in ("--set", s)]]


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_sigterm_checkpoints_exits_75_and_resumes(shapes_shards, tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, **_env(tmp_path)}
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_sets(shapes_shards, out, "train.steps=100000")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():
        time.sleep(0.5)
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == EXIT_PREEMPTED, stdout + stderr
    assert "preempted" in stdout and "checkpoint" in stdout
    latest = (out / "checkpoints" / "latest").read_text()
    step = int(latest.removeprefix("step_").removesuffix(".pt"))
    assert step >= 1 and max(_losses(out)) == step  # the checkpoint is of the last finished step
    resumed = run_main("train", *_sets(shapes_shards, out, f"train.steps={step + 2}"), "--resume", "latest")
    assert f"(step {step})" in resumed.stdout and max(_losses(out)) == step + 2


def test_sigkill_during_a_checkpoint_write_resumes_from_the_previous(shapes_shards, tmp_path):
    out = tmp_path / "run"
    # the 2nd torch.save is the step-4 checkpoint: killed half-way through writing it
    killed = run_cli("train", *_sets(shapes_shards, out), env=_env(tmp_path, VLP_FAULT_KILL_IN_SAVE="2"), check=False)
    assert killed.returncode == -signal.SIGKILL
    ckpts = out / "checkpoints"
    assert (ckpts / "latest").read_text() == "step_00000002.pt"
    assert not (ckpts / "step_00000004.pt").exists() and (ckpts / "step_00000004.pt.tmp").exists()
    resumed = run_main("train", *_sets(shapes_shards, out), "--resume", "latest")
    assert "(step 2)" in resumed.stdout and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
    assert not (ckpts / "step_00000004.pt.tmp").exists() or (ckpts / "step_00000004.pt").exists()


@pytest.mark.parametrize("seed", [0])
def test_sigkill_at_a_random_moment_then_resume_loses_nothing(shapes_shards, tmp_path, seed):
    """SIGKILL after a random delay (seeded; it lands in a step, a data read or a checkpoint write):
    the resumed run trains every step exactly once, from the last complete checkpoint."""
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_sets(shapes_shards, out, "train.steps=100000")]
    env = {**os.environ, **_env(tmp_path)}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while time.time() < deadline and not (out / "metrics.jsonl").is_file():  # training has started
        time.sleep(0.05)
    time.sleep(random.Random(seed).uniform(0.0, 2.0))
    proc.kill()
    proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL  # killed mid-run, not after the end
    latest = out / "checkpoints" / "latest"
    last = int(latest.read_text().removeprefix("step_").removesuffix(".pt")) if latest.exists() else 0
    resumed = run_main("train", *_sets(shapes_shards, out, f"train.steps={last + 3}"), "--resume", "latest")
    assert (f"(step {last})" in resumed.stdout) == (last > 0), resumed.stdout
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert steps == list(range(1, last + 4)), (last, steps)  # none lost, none logged twice


def test_nonfinite_steps_are_skipped_and_counted(shapes_shards, tmp_path):
    out = tmp_path / "run"
    proc = run_cli("train", *_sets(shapes_shards, out), env=_env(tmp_path, VLP_FAULT_NAN_CALLS="2,3"))
    records = read_metrics(out / "metrics.jsonl")
    assert sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]  # six good steps; the two bad batches were extra
    assert records[-1].get("train/skipped_nonfinite") == 2 or any(
        r.get("train/skipped_nonfinite") == 2 for r in records
    )
    assert "skipped 2 non-finite" in proc.stdout


def test_consecutive_nonfinite_steps_stop_with_a_clear_error(shapes_shards, tmp_path):
    out = tmp_path / "run"
    sets = _sets(shapes_shards, out, "train.max_bad_steps=3")
    proc = run_cli("train", *sets, env=_env(tmp_path, VLP_FAULT_NAN_CALLS="3,4,5,6,7"), check=False)
    assert proc.returncode == 3, proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert "step 3: loss or gradients not finite for 3 steps in a row" in err
    assert "step_00000002.pt" in err  # the last good checkpoint, named


def test_a_dead_rank_does_not_hang_the_others(shapes_shards, tmp_path):
    out = tmp_path / "run"
    port = str(free_port())
    base = {**os.environ, **_env(tmp_path, VLP_FAULT_DIE_AT_STEP="3"), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
            "WORLD_SIZE": "2"}  # fmt: skip
    cmd = [sys.executable, "-m", "vlp.train", *_sets(shapes_shards, out, "train.dist_timeout_s=30")]
    procs = [
        subprocess.Popen(
            cmd,
            cwd=REPO,
            env={**base, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for r in (0, 1)
    ]
    t0 = time.time()
    survivor_out, survivor_err = procs[0].communicate(timeout=180)
    procs[1].communicate(timeout=30)
    assert procs[1].returncode == -signal.SIGKILL
    assert procs[0].returncode not in (0, None) and time.time() - t0 < 180, survivor_err[-2000:]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["data.batch_size=-2"], "'data.batch_size' = -2 must be >= 1"),
        (["loss.contrastive.impl=magic"], "'loss.contrastive.impl' expects one of"),
        (
            ["loss.contrastive.impl=grouped", "loss.contrastive.group_size=2"],
            "group_size=2 does not divide the world size 1",
        ),
        (
            ["loss.distill.enabled=true", "loss.distill.queue_size=100"],
            "queue_size=100 must be a multiple of the global batch 16",
        ),
        (
            ["train.backend=deepspeed", "train.deepspeed.zero_stage=5"],
            "'train.deepspeed.zero_stage' = 5 must be 0, 1, 2 or 3",
        ),
    ],
)
def test_invalid_configs_fail_before_reading_data(tmp_path, extra, message):
    out = tmp_path / "run"
    shards = {"train": str(tmp_path / "no-such-shard-{000..009}.tar")}  # reading data would fail differently
    proc = run_main("train", *_sets(shards, out, *extra), check=False)
    assert proc.returncode == 2, proc.stderr
    lines = [line for line in proc.stderr.strip().splitlines() if line.startswith("vlp train: error:")]
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert not out.exists()  # nothing written: the run can simply be started again


def test_a_failed_periodic_checkpoint_keeps_the_previous_and_training_goes_on(shapes_shards, tmp_path):
    out = tmp_path / "run"
    # the 2nd torch.save (step 4) fails as on a full disk; steps 5-6 and the final checkpoint still happen
    hooks = _env(tmp_path)
    (tmp_path / "hooks" / "sitecustomize.py").write_text(
        HOOKS
        + textwrap.dedent(
            """
            import torch
            _save, _n = torch.save, [0]
            def _full_disk(obj, f, *a, **k):
                _n[0] += 1
                if _n[0] == 2:
                    raise OSError(28, "No space left on device")
                return _save(obj, f, *a, **k)
            torch.save = _full_disk
            """
        )
    )
    proc = run_cli("train", *_sets(shapes_shards, out), env=hooks)
    assert "checkpoint at step 4 not written" in proc.stderr and "No space left" in proc.stderr
    names = sorted(p.name for p in (out / "checkpoints").glob("step_*.pt"))
    assert names == ["step_00000002.pt", "step_00000006.pt"] and sorted(_losses(out)) == [1, 2, 3, 4, 5, 6]
