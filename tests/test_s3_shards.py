"""Training shards on S3 (moto's server behind a proxy, tests/s3_server.py): streamed like local ones,
listed by glob, resumed by range reads that fetch fewer bytes than reading the epoch again, through
the real CLI too; an unreachable store is counted as shard errors."""

from __future__ import annotations

import importlib
import shutil
from pathlib import Path

import pytest
import torch

from tests.conftest import run_main
from tests.test_data_offsets import _loader, _shards, _take, assert_same, reread, resumes_agree
from vlp.data.shardlists import DataConfigError, expand_urls, read_sizes
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.transforms import eval_transform
from vlp.models.tokenizer import get_tokenizer
from vlp.train.logging import read_metrics


def _upload(folder: Path, bucket: str, prefix: str = "") -> str:
    import s3fs

    fs = s3fs.S3FileSystem()
    for f in sorted(folder.iterdir()):
        if f.is_file():
            fs.put_file(str(f), f"{bucket}/{prefix}{f.name}")
    return f"s3://{bucket}/{prefix}"


@pytest.fixture()
def s3_shards(s3_server, tmp_path) -> dict:
    local = _shards(tmp_path / "local")
    root = _upload(tmp_path / "local", s3_server.bucket())
    return {"local": local, "s3": root + "shard-{000000..000003}.tar", "root": root}


class _Counted:
    """A socket whose received bytes are added to ``tally``."""

    def __init__(self, sock, tally: list):
        self.sock, self.tally = sock, tally

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.tally[0] += len(data)
        return data

    def __getattr__(self, name):
        return getattr(self.sock, name)


@pytest.fixture()
def wire(s3_server, monkeypatch) -> list:
    """``[bytes]`` sent by the S3 server to this process's clients since the fixture started (counted at
    the proxy, on connections opened from then on: s3fs's cached clients are dropped for that)."""
    import s3fs

    proxy, tally = s3_server.proxy, [0]
    forward = proxy._pipe

    def counting(src, dst):
        if src.getpeername()[1] == proxy.target:
            src = _Counted(src, tally)
        forward(src, dst)

    monkeypatch.setattr(proxy, "_pipe", counting)
    s3fs.S3FileSystem.clear_instance_cache()
    return tally


@pytest.mark.parametrize("workers", [0, 2])
def test_s3_stream_equals_local(s3_shards, workers):
    assert_same(
        _take(_loader(s3_shards["local"], workers=workers), 14), _take(_loader(s3_shards["s3"], workers=workers), 14)
    )


def test_s3_eval_pass_equals_local(s3_shards):
    def one_pass(pattern):
        spec = StreamSpec(sources=[expand_urls(pattern)], batch_size=10, infinite=False)
        return list(StreamLoader(spec, eval_transform(32, (0.5,) * 3, (0.5,) * 3), get_tokenizer("debug"), 0))

    local, remote = one_pass(s3_shards["local"]), one_pass(s3_shards["s3"])
    assert sum(len(b["caption"]) for b in remote) == 96
    assert_same(local, remote)


def test_s3_glob_and_sizes(s3_shards, s3_server, tmp_path):
    urls = expand_urls(s3_shards["root"] + "shard-*.tar")
    assert urls == expand_urls(s3_shards["s3"])
    assert read_sizes(urls) is None  # no sizes.json beside them yet
    sizes = tmp_path / "sizes" / "sizes.json"
    sizes.parent.mkdir()
    sizes.write_text('{"shard-000000.tar": 24, "shard-000001.tar": 24, "shard-000002.tar": 24, "shard-000003.tar": 24}')
    _upload(sizes.parent, s3_shards["root"].removeprefix("s3://").rstrip("/"))
    assert read_sizes(urls) == 96
    with pytest.raises(DataConfigError, match="no shard matches"):
        expand_urls(s3_shards["root"] + "nope-*.tar")


def test_a_scheme_without_its_package_stops_before_reading(monkeypatch):
    registry = importlib.import_module("fsspec.registry")  # the module: fsspec.registry is its mapping
    monkeypatch.setitem(registry.known_implementations, "s3", {"class": "nosuch.S3", "err": "install s3fs"})
    monkeypatch.delitem(registry._registry, "s3", raising=False)
    with pytest.raises(DataConfigError, match=r"data.train_shards: cannot read 's3://b/a-\{0..1\}.tar': install s3fs"):
        expand_urls("s3://b/a-{0..1}.tar")


def test_s3_resume_range_reads_fewer_bytes(s3_shards, wire):
    # one reader over 4 shards of 24 samples: stopped after 80 samples, late in the epoch
    state = resumes_agree(s3_shards["s3"], stop=10, total=12)
    assert state["slots"]["0"]["seek"][0] is not None
    fetched = {}
    for how, saved in (("seek", state), ("reread", reread(state))):
        wire[0] = 0
        _take(_loader(s3_shards["s3"], saved), 1)
        fetched[how] = wire[0]
    assert fetched["seek"] < fetched["reread"] / 2, fetched


def test_unreachable_storage_is_counted_as_shard_errors(s3_shards, s3_server):
    s3_server.proxy.cut()
    spec = StreamSpec(sources=[expand_urls(s3_shards["s3"])[:1]], batch_size=10, infinite=False)
    loader = StreamLoader(spec, eval_transform(32, (0.5,) * 3, (0.5,) * 3), get_tokenizer("debug"), 0)
    assert list(loader) == []
    assert loader.skipped == {"shard_error": 1}


@pytest.mark.slow
def test_vlp_train_from_s3_resumes_like_an_uninterrupted_run(s3_server, shapes_shards, tmp_path):
    root = _upload(Path(shapes_shards["train"]).parent, s3_server.bucket())
    pattern = root + Path(shapes_shards["train"]).name

    def sets(out):
        base = [
            f"data.train_shards=['{pattern}']",
            f"data.val_shards=['{shapes_shards['val']}']",
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
            "eval.tasks=[]",
        ]
        return ["--config", "configs/demo.yaml", *(a for s in base for a in ("--set", s))]

    full, cut = tmp_path / "full", tmp_path / "cut"
    run_main("train", *sets(full), env=s3_server.env())
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000003.pt")
    state = torch.load(cut / "checkpoints" / "step_00000003.pt", weights_only=True)["data"]
    assert all(p is not None for rank in state for slot in rank["slots"].values() for p in slot["seek"])
    proc = run_main("train", *sets(cut), "--resume", "latest", env=s3_server.env())
    assert "(step 3)" in proc.stdout

    def losses(out):
        return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}

    a, b = losses(full), losses(cut)
    for step in (4, 5, 6):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)
