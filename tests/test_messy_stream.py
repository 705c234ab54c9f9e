"""The training stream on messy shard sets: nothing usable stops with one line (never a spin),
compressed tars read without false damage reports, captions cut to the context are counted, and a
stop signal while waiting for data still checkpoints."""

from __future__ import annotations

import contextlib
import gzip
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO, good_sample, run_main, write_tar
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.transforms import train_transform
from vlp.data.usable import NoUsableDataError
from vlp.models.tokenizer import get_tokenizer
from vlp.train.guards import EXIT_PREEMPTED
from vlp.train.logging import read_metrics

UNUSABLE = {
    "captions_only": lambda i: {"__key__": f"k{i:03d}", "txt": b"a caption without its image"},
    "zero_byte_images": lambda i: {"__key__": f"k{i:03d}", "png": b"", "txt": b"an image of zero bytes"},
    "undecodable_images": lambda i: {"__key__": f"k{i:03d}", "jpg": b"\xff\xd8 not a jpeg", "txt": b"x"},
}


def _loader(urls, workers=0, batch_size=4, **spec) -> StreamLoader:
    s = StreamSpec(sources=[urls], batch_size=batch_size, shuffle_buffer=8, **spec)
    return StreamLoader(s, train_transform(32), get_tokenizer("debug"), workers)


@pytest.mark.parametrize("kind", sorted(UNUSABLE))
@pytest.mark.parametrize("workers", [0, 2])
def test_a_shard_set_with_no_usable_sample_stops_with_the_shards_and_counts(tmp_path, kind, workers):
    urls = [str(write_tar(tmp_path / f"bad-{j}.tar", [UNUSABLE[kind](10 * j + i) for i in range(5)])) for j in (0, 1)]
    t0 = time.perf_counter()
    with pytest.raises(NoUsableDataError) as err:
        next(iter(_loader(urls, workers)))
    assert time.perf_counter() - t0 < 30
    message = str(err.value)
    assert "\n" not in message and "no usable training sample" in message
    assert "bad-0.tar" in message and "skipped:" in message
    expected = {"captions_only": "missing_image", "zero_byte_images": "corrupt_image"}.get(kind, "corrupt_image")
    assert f"'{expected}'" in message


def test_an_empty_tar_as_the_only_shard_stops_with_one_line(tmp_path):
    empty = tmp_path / "empty.tar"
    write_tar(empty, [])
    with pytest.raises(NoUsableDataError, match="hold no samples|skipped"):
        next(iter(_loader([str(empty)])))


def test_the_bound_stops_a_large_unusable_set_before_reading_it_all(tmp_path):
    urls = [str(write_tar(tmp_path / f"b{j}.tar", [UNUSABLE["captions_only"](i) for i in range(50)])) for j in range(8)]
    with pytest.raises(NoUsableDataError, match="read 30 samples in a row.*max_unusable_samples"):
        next(iter(_loader(urls, max_unusable=30)))


def test_a_fully_bad_shard_among_good_ones_does_not_stop_the_run(tmp_path):
    """One reader per shard: the reader dealt the bad shard in an epoch reads past it; the run goes on."""
    bad = write_tar(tmp_path / "s-0.tar", [UNUSABLE["zero_byte_images"](i) for i in range(12)])
    good = write_tar(tmp_path / "s-1.tar", [good_sample(f"g{i:03d}", f"caption {i}") for i in range(12)])
    loader = _loader([str(bad), str(good)], workers=2)
    it = iter(loader)
    batches = [next(it) for _ in range(12)]
    loader.close()
    assert all(len(b["caption"]) == 4 for b in batches)
    assert loader.skipped["corrupt_image"] >= 12


def _gzipped(path, samples):
    plain = write_tar(path.with_suffix(".plain"), samples)
    path.write_bytes(gzip.compress(plain.read_bytes()))
    plain.unlink()
    return path


def test_compressed_shards_are_read_without_false_damage_reports(tmp_path):
    samples = [good_sample(f"g{i:03d}", f"caption {i}") for i in range(8)]
    urls = [str(_gzipped(tmp_path / "a.tar.gz", samples[:4])), str(_gzipped(tmp_path / "b.tgz", samples[4:]))]
    loader = _loader(urls, infinite=False, batch_size=8)
    keys = sorted(k for b in loader for k in b["__key__"])
    assert keys == [f"g{i:03d}" for i in range(8)]
    assert "shard_error" not in loader.skipped
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes((tmp_path / "a.tar.gz").read_bytes()[:-40])  # a download cut short
    loader = _loader([str(cut)], infinite=False, batch_size=8)
    list(loader)
    assert loader.skipped["shard_error"] == 1


def test_captions_longer_than_the_context_are_counted(tmp_path):
    long = "a very long caption " * 20  # well over the debug model's 32 tokens
    samples = [good_sample(f"s{i:03d}", long if i % 4 == 0 else f"short {i}") for i in range(16)]
    write_tar(tmp_path / "s.tar", samples)
    loader = _loader([str(tmp_path / "s.tar")], infinite=False, batch_size=8)
    assert sum(len(b["caption"]) for b in loader) == 16
    assert loader.truncated_captions == 4
    assert loader.state_dict()["truncated_captions"] == 4


def _train_sets(out, shards, *extra):
    base = [
        f"data.train_shards=['{shards}']",
        "data.val_shards=[]",
        "eval.tasks=[]",
        "eval.data=[]",
        "data.batch_size=4",
        "data.shuffle_buffer=0",
        f"train.output_dir={out}",
        "train.steps=4",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.device=cpu",
        *extra,
    ]
    return ["--config", "configs/demo.yaml", *[a for s in base for a in ("--set", s)]]


@pytest.mark.parametrize(
    "kind, workers, counted",
    [
        ("zero_byte_images", 0, "'corrupt_image': 12"),
        ("zero_byte_images", 1, "'corrupt_image': 12"),
        ("captions_only", 0, "'missing_image': 12"),
        ("empty", 0, "the shards hold no samples"),
    ],
)
def test_vlp_train_on_unusable_shards_exits_2_with_one_line(tmp_path, kind, workers, counted):
    pattern = str(tmp_path / "bad-{0..1}.tar")
    for j in (0, 1):
        write_tar(tmp_path / f"bad-{j}.tar", [] if kind == "empty" else [UNUSABLE[kind](10 * j + i) for i in range(6)])
    t0 = time.perf_counter()
    proc = run_main("train", *_train_sets(tmp_path / "run", pattern, f"data.workers={workers}"), check=False)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert time.perf_counter() - t0 < 60
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp train: error:")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr
    assert "bad-0.tar" in errors[0] and counted in errors[0]
    assert not (tmp_path / "run" / "checkpoints").exists() or not any((tmp_path / "run" / "checkpoints").iterdir())


def test_truncated_captions_are_reported_in_metrics_and_at_the_end(tmp_path):
    long = "a very long caption " * 20
    write_tar(tmp_path / "s-0.tar", [good_sample(f"s{i:03d}", long if i < 4 else f"short {i}") for i in range(16)])
    out = tmp_path / "run"
    proc = run_main("train", *_train_sets(out, str(tmp_path / "s-0.tar"), "data.workers=0", "train.steps=4"))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert records[-1]["data/truncated_captions"] == 4  # 16 samples read, 4 of them long
    assert "4 caption(s) were longer than the model's 32-token context and were cut" in proc.stdout


def _slow_pipe(tmp_path, shard, first_read_waits=False) -> str:
    """A shard url served through a pipe that answers at once the first time and then waits 60 s:
    the second epoch's read blocks, as a stalled network read would."""
    mark = tmp_path / "read-once"
    if first_read_waits:
        mark.touch()
    script = tmp_path / "slow.sh"
    script.write_text(f"if [ -f {mark} ]; then sleep 60; fi\ntouch {mark}\ncat {shard}\n")
    return f"pipe:sh {script}"


@pytest.mark.slow
@pytest.mark.parametrize("workers", [0, 1])
def test_sigterm_while_waiting_for_data_checkpoints_the_last_step(tmp_path, workers):
    shard = write_tar(tmp_path / "s.tar", [good_sample(f"s{i:03d}", f"caption {i}") for i in range(8)])
    url = _slow_pipe(tmp_path, shard)
    out = tmp_path / "run"
    sets = _train_sets(out, url, f"data.workers={workers}", "train.steps=1000", "train.checkpoint_every=0")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vlp.cli", "train", *sets],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # the pipe's `sleep` is ended with the whole group below
    )
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not _steps(out) >= 2:  # the one epoch's 2 batches, then the wait
            time.sleep(0.3)
        time.sleep(1.5)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
        waited = time.perf_counter() - t0
    finally:
        _end_group(proc)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_PREEMPTED, stdout + stderr
    assert waited < 20, waited  # not the 60 s the read would have taken
    assert (out / "checkpoints" / "latest").read_text() == "step_00000002.pt"
    assert "preempted by SIGTERM after step 2" in stdout and "Traceback" not in stderr


def _end_group(proc) -> None:
    """Kill what is left of the run's process group (the pipe's orphaned `sleep` holds its stderr)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def _steps(out) -> int:
    try:
        return max((r["step"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r), default=0)
    except (OSError, ValueError):
        return 0


@pytest.mark.slow
def test_sigterm_before_the_first_batch_exits_cleanly_with_nothing_to_checkpoint(tmp_path):
    shard = write_tar(tmp_path / "s.tar", [good_sample(f"s{i:03d}") for i in range(8)])
    url = _slow_pipe(tmp_path, shard, first_read_waits=True)
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "vlp.cli", "train", *_train_sets(out, url, "data.workers=0")]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (out / "config.yaml").is_file():
            time.sleep(0.3)
        time.sleep(2.0)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    finally:
        _end_group(proc)
    stdout, stderr = proc.communicate(timeout=10)
    assert proc.returncode == EXIT_PREEMPTED, stdout + stderr
    assert "nothing to checkpoint" in stdout and "Traceback" not in stderr
    assert not list((out / "checkpoints").glob("step_*"))


def test_decode_options_carry_the_image_policy():
    from vlp.config import load_config
    from vlp.train.data import decode_options

    cfg = load_config(None, ["data.exif_transpose=false", "data.alpha_background=#000000"])
    policy = decode_options(cfg.data).image_policy
    assert policy.exif_transpose is False and policy.background == (0, 0, 0)
