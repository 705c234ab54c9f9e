"""Run folders on object storage (``train.output_dir: s3://...``) against a real S3 server (moto's, on
127.0.0.1 behind a proxy the test controls; tests/s3_server.py): train, kill -9 during an upload,
resume on the same or another machine, the storage unreachable for a while and for good, a fresh
start refused over another run, sharded (FSDP) checkpoints, and eval / export / load_model from the URL."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.conftest import REPO, run_cli, run_main
from tests.distributed import backend_run_sets, torchrun_cmd
from vlp.train.logging import read_metrics

pytestmark = pytest.mark.slow

STEP = "step_{:08d}.pt"


def _sets(shards, out, staging, *extra):
    base = [
        f"data.train_shards=['{shards['train']}']",
        "data.val_shards=[]",
        "data.batch_size=16",
        "data.workers=0",
        "data.shuffle_buffer=64",
        f"train.output_dir={out}",
        f"train.staging_dir={staging}",
        "train.steps=6",
        "train.warmup_steps=2",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.device=cpu",
        "eval.data=[]",
        "eval.tasks=[]",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", *[a for s in base for a in ("--set", s)]]


def _losses(records):
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def _remote_metrics(fs, url):
    import json

    return [json.loads(line) for line in fs.cat_file(f"{url}/metrics.jsonl").decode().splitlines() if line]


@pytest.fixture(scope="module")
def local_run(shapes_shards, tmp_path_factory):
    """The same run, uninterrupted, in a local folder: the losses every resumed remote run must equal."""
    out = tmp_path_factory.mktemp("local") / "run"
    run_main("train", *_sets(shapes_shards, out, ""))
    return out, _losses(read_metrics(out / "metrics.jsonl"))


def _env(server, **extra):
    return {**os.environ, **server.env(), "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def _fs():
    import s3fs

    return s3fs.S3FileSystem(skip_instance_cache=True)


def test_killed_during_an_upload_resumes_on_another_machine(s3_server, shapes_shards, local_run, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    args = _sets(shapes_shards, url, tmp_path / "machine1")
    # kill -9 right after step 4's file reached the storage, before its checksum and `latest`
    proc = run_cli("train", *args, env=_env(s3_server, VLP_STORAGE_KILL_AFTER=STEP.format(4)), check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    keys = s3_server.keys(bucket, "run/checkpoints/")
    assert f"run/checkpoints/{STEP.format(4)}" in keys and f"run/checkpoints/{STEP.format(4)}.sha256" not in keys
    fs = _fs()
    assert fs.cat_file(f"{url}/checkpoints/latest").decode() == STEP.format(2)

    # another machine: nothing staged; the last complete checkpoint (step 2) is downloaded and verified
    args2 = _sets(shapes_shards, url, tmp_path / "machine2")
    done = run_main("train", *args2, "--resume", "latest", env={"VLP_CACHE": str(tmp_path / "cache")})
    assert "(step 2)" in done.stdout and f"outputs in {url}" in done.stdout
    full = local_run[1]
    got = _losses(_remote_metrics(_fs(), url))
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # the remote metrics: one record per step
    for step in (3, 4, 5, 6):
        assert got[step] == pytest.approx(full[step], abs=1e-6), (step, full, got)
    keys = s3_server.keys(bucket, "run/")
    assert f"run/checkpoints/{STEP.format(6)}.sha256" in keys and "run/config.yaml" in keys
    assert _fs().cat_file(f"{url}/checkpoints/latest").decode() == STEP.format(6)
    assert any(k.startswith("run/tensorboard/events") for k in keys)


def test_resume_on_the_same_machine_uploads_what_the_kill_left_first(s3_server, shapes_shards, local_run, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    args = _sets(shapes_shards, url, tmp_path / "staging")
    proc = run_cli("train", *args, env=_env(s3_server, VLP_STORAGE_KILL_AFTER=STEP.format(4)), check=False)
    assert proc.returncode == -signal.SIGKILL
    done = run_main("train", *args, "--resume", "latest")
    assert "(step 4)" in done.stdout  # the staged step 4 reached the storage before training went on
    got = _losses(_remote_metrics(_fs(), url))
    assert got[6] == pytest.approx(local_run[1][6], abs=1e-6)
    # retention (keep 3) applied remotely too
    names = {k.split("/")[-1] for k in s3_server.keys(bucket, "run/checkpoints/")}
    assert names == {"latest", *(f"{STEP.format(s)}{x}" for s in (2, 4, 6) for x in ("", ".sha256"))}


def _wait_for(predicate, timeout=120.0):
    end = time.time() + timeout
    while time.time() < end:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError("timed out")


def _paused(proc, server, bucket, key):
    """Stop ``proc`` once ``key`` is on the storage (SIGSTOP), so the test cuts the storage at a known point."""
    _wait_for(lambda: key in server.keys(bucket, "run/") or proc.poll() is not None)
    os.kill(proc.pid, signal.SIGSTOP)


def test_storage_unreachable_for_a_while_is_retried(s3_server, shapes_shards, local_run, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    # botocore's own retries off, so that vlp's retries (with their log lines) carry the outage
    env = _env(s3_server, VLP_STORAGE_RETRIES="12", VLP_STORAGE_BACKOFF="0.25", AWS_MAX_ATTEMPTS="1")
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_sets(shapes_shards, url, tmp_path / "staging")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _paused(proc, s3_server, bucket, f"run/checkpoints/{STEP.format(2)}.sha256")
    s3_server.proxy.cut()
    os.kill(proc.pid, signal.SIGCONT)
    time.sleep(4)
    s3_server.proxy.restore()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert "retrying" in err
    assert _fs().cat_file(f"{url}/checkpoints/latest").decode() == STEP.format(6)
    assert _losses(_remote_metrics(_fs(), url))[6] == pytest.approx(local_run[1][6], abs=1e-6)


def test_storage_gone_keeps_the_local_copy_and_a_resume_uploads_it(s3_server, shapes_shards, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    staging = tmp_path / "staging"
    env = _env(s3_server, VLP_STORAGE_RETRIES="2", VLP_STORAGE_BACKOFF="0.1", AWS_MAX_ATTEMPTS="1")
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_sets(shapes_shards, url, staging)]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _paused(proc, s3_server, bucket, "run/checkpoints/latest")
    s3_server.proxy.cut()
    os.kill(proc.pid, signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 4, err[-3000:]
    errors = [line for line in err.splitlines() if line.startswith("vlp train: error:")]
    assert len(errors) == 1 and str(staging) in errors[0] and "--resume latest" in errors[0]
    assert (staging / "checkpoints" / STEP.format(6)).is_file()  # the local copy is kept
    s3_server.proxy.restore()
    run_main("train", *_sets(shapes_shards, url, staging), "--resume", "latest")
    assert _fs().cat_file(f"{url}/checkpoints/latest").decode() == STEP.format(6)
    assert len(_losses(_remote_metrics(_fs(), url))) == 6


def test_unreachable_storage_at_start_is_one_line(s3_server, shapes_shards, tmp_path):
    bucket = s3_server.bucket()
    s3_server.proxy.cut()
    fail_fast = {"VLP_STORAGE_RETRIES": "2", "VLP_STORAGE_BACKOFF": "0.1", "AWS_MAX_ATTEMPTS": "1"}
    proc = run_main("train", *_sets(shapes_shards, f"s3://{bucket}/run", tmp_path / "s"), check=False, env=fail_fast)
    assert proc.returncode == 4
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp train: error:")]
    assert len(errors) == 1 and f"s3://{bucket}/run" in errors[0] and "after 2 tries" in errors[0]


def test_remote_folder_ownership_and_reading_a_remote_checkpoint(s3_server, shapes_shards, tmp_path):
    import vlp

    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    run_main("train", *_sets(shapes_shards, url, tmp_path / "a", "train.steps=2"))
    # a fresh start over another run's checkpoints is refused, --overwrite replaces them
    refused = run_main("train", *_sets(shapes_shards, url, tmp_path / "b", "train.steps=2"), check=False)
    assert refused.returncode == 2 and "already holds another run's checkpoints" in refused.stderr
    assert url in refused.stderr
    run_main("train", *_sets(shapes_shards, url, tmp_path / "b", "train.steps=4", "train.seed=1"), "--overwrite")
    names = {k.split("/")[-1] for k in s3_server.keys(bucket, "run/checkpoints/")}
    assert names == {"latest", *(f"{STEP.format(s)}{x}" for s in (2, 4) for x in ("", ".sha256"))}
    assert len(_losses(_remote_metrics(_fs(), url))) == 4  # the old run's metrics went with --overwrite

    # vlp.load_model, vlp export and vlp eval take the remote checkpoint (run folder or file)
    os.environ["VLP_CACHE"] = str(tmp_path / "cache")
    try:
        remote_model, _, _ = vlp.load_model(url)
        local_model, _, _ = vlp.load_model(tmp_path / "b" / "checkpoints" / STEP.format(4))
        for (k, a), b in zip(remote_model.state_dict().items(), local_model.state_dict().values(), strict=True):
            assert torch.equal(a, b), k
        run_main("export", "--checkpoint", f"{url}/checkpoints/{STEP.format(4)}", "--format", "safetensors",
                 "--out", tmp_path / "exported")  # fmt: skip
        assert (tmp_path / "exported" / "model.safetensors").is_file()
        ev = run_main("eval", "--checkpoint", url, "--task", "zeroshot_retrieval", "--data", shapes_shards["val"],
                      "--out", tmp_path / "eval.json")  # fmt: skip
        assert (tmp_path / "eval.json").is_file(), ev.stderr[-2000:]
        # a local run goes on from a remote checkpoint
        went_on = run_main("train", *_sets(shapes_shards, tmp_path / "local", "", "train.steps=5", "train.seed=1"),
                           "--resume", f"{url}/checkpoints/{STEP.format(4)}")  # fmt: skip
        assert "(step 4)" in went_on.stdout and (tmp_path / "local" / "checkpoints" / STEP.format(5)).is_file()
        # a damaged remote object is caught by its checksum, not loaded
        _fs().pipe_file(f"{bucket}/run/checkpoints/{STEP.format(4)}", b"not a checkpoint")
        os.environ["VLP_CACHE"] = str(tmp_path / "cache2")  # a machine that has not downloaded it yet
        with pytest.raises(Exception, match="checksum mismatch"):
            vlp.load_model(f"{url}/checkpoints/{STEP.format(4)}")
    finally:
        os.environ.pop("VLP_CACHE", None)


def test_sharded_fsdp_checkpoints_on_the_storage_resume_elsewhere(s3_server, shapes_shards, tmp_path):
    bucket = s3_server.bucket()
    url = f"s3://{bucket}/run"
    env = _env(s3_server)

    def run(staging, *extra):
        args = ["--config", "configs/demo.yaml", *backend_run_sets(shapes_shards, url, "train.backend=fsdp",
                f"train.staging_dir={staging}")]  # fmt: skip
        proc = subprocess.run(torchrun_cmd("vlp.train", [*args, *extra], 2), cwd=REPO, env=env, capture_output=True,
                              text=True, timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
        return proc

    run(tmp_path / "m1")
    keys = s3_server.keys(bucket, "run/checkpoints/")
    assert (
        "run/checkpoints/step_00000002/vlp_complete.json" in keys
        and "run/checkpoints/step_00000003/vlp_complete.json" in keys
    )
    full = _losses(_remote_metrics(_fs(), url))
    # a run killed before step 3's marker: that folder is incomplete, `latest` still names step 2
    fs = _fs()
    fs.rm_file(f"{bucket}/run/checkpoints/step_00000003/vlp_complete.json")
    fs.pipe_file(f"{bucket}/run/checkpoints/latest", b"step_00000002")
    proc = run(tmp_path / "m2", "--resume", "latest")
    assert "(step 2)" in proc.stdout
    assert _losses(_remote_metrics(_fs(), url))[3] == pytest.approx(full[3], abs=1e-6)
