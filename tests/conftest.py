"""Shared fixtures: small shard sets made inside the tests (no downloads)."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def shapes_shards(tmp_path_factory) -> dict:
    """256 training samples in 8 shards and 64 held-out single-group samples in 1 shard."""
    from vlp.data.shards import write_synthetic_shards

    root = tmp_path_factory.mktemp("shapes")
    train = write_synthetic_shards(root / "train", 256, seed=1, max_samples_per_shard=32, progress=False)
    val = write_synthetic_shards(
        root / "val", 64, seed=1, start_index=10**7, single_group=True, max_samples_per_shard=64, progress=False
    )
    return {
        "root": root,
        "train": str(root / "train" / train["shards"]),
        "val": str(root / "val" / val["shards"]),
        "train_info": train,
    }


def png_bytes(size=(32, 32), color=(200, 30, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, color).save(buf, format="PNG")
    return buf.getvalue()


def write_tar(path: Path, samples: list[dict]) -> Path:
    """Write ``samples`` ({"__key__", ext: bytes, ...}) as a WebDataset tar."""
    with tarfile.open(path, "w") as tar:
        for s in samples:
            for ext, data in s.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def good_sample(key: str, caption: str = "a red square") -> dict:
    return {"__key__": key, "png": png_bytes(), "txt": caption.encode(), "json": json.dumps({"k": key}).encode()}


# Every bad-data kind the stream must skip and count, and the samples that trigger it.
BAD_SAMPLES = {
    "missing_image": {"__key__": "b_noimg", "txt": b"caption without image"},
    "corrupt_image": {"__key__": "b_corrupt", "png": b"\x89PNG not really", "txt": b"broken image"},
    "image_too_large": {"__key__": "b_large", "png": png_bytes((400, 400)), "txt": b"huge image"},
    "missing_caption": {"__key__": "b_nocap", "png": png_bytes()},
    "empty_caption": {"__key__": "b_empty", "png": png_bytes(), "txt": b"   \n"},
    "bad_caption_encoding": {"__key__": "b_enc", "png": png_bytes(), "txt": b"\xff\xfe\xfa bad"},
}
ZERO_BYTE = {"__key__": "b_zero", "png": b"", "txt": b"zero-byte image"}  # also corrupt_image


@pytest.fixture()
def bad_shards(tmp_path) -> dict:
    """Two good shards, one with every bad kind, and one truncated tar. ``max_image_pixels`` must
    be set below 400*400 by the user of this fixture."""
    good = [good_sample(f"g{i:03d}") for i in range(24)]
    write_tar(tmp_path / "s-000000.tar", good[:12])
    write_tar(tmp_path / "s-000001.tar", good[12:])
    write_tar(tmp_path / "s-000002.tar", [good_sample("g100"), *BAD_SAMPLES.values(), ZERO_BYTE, good_sample("g101")])
    full = write_tar(tmp_path / "full.tar", [good_sample(f"t{i:03d}") for i in range(8)])
    data = full.read_bytes()
    (tmp_path / "s-000003.tar").write_bytes(data[: len(data) // 2 + 100])
    full.unlink()
    return {"pattern": str(tmp_path / "s-{000000..000003}.tar"), "good": 24 + 2, "folder": tmp_path}


def run_cli(*args, cwd=None, env=None, timeout=600, check=True) -> subprocess.CompletedProcess:
    """Run ``python -m vlp.cli ARGS`` (the real console entry point) and return the result."""
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    proc = subprocess.run(
        [sys.executable, "-m", "vlp.cli", *map(str, args)],
        cwd=cwd or REPO,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"vlp {args[0]} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


def run_main(*args, env=None, check=True, cwd=None) -> subprocess.CompletedProcess:
    """``vlp ARGS`` in this process (``vlp.cli.main``), for commands whose test needs no process of its
    own (no signals, torchrun or start-up hooks): the same parsing, dispatch, exit codes and messages as
    :func:`run_cli` without the 6-7 s of a fresh interpreter importing torch and open_clip. Its stdout,
    stderr and vlp's log lines (in the CLI's format) are captured; ``env`` is set for the call only, and
    it runs in ``cwd`` (default: the repository root)."""
    import contextlib
    import logging

    from vlp.cli import main

    out, err = io.StringIO(), io.StringIO()
    handler = logging.StreamHandler(err)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    vlp_log = logging.getLogger("vlp")
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    os.environ.update({k: str(v) for k, v in (env or {}).items()})
    os.chdir(cwd or REPO)
    vlp_log.addHandler(handler)
    root_handlers = list(logging.root.handlers)  # main's basicConfig must not keep a handler on our buffer
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse errors
                code = e.code if isinstance(e.code, int) else 2
    finally:
        vlp_log.removeHandler(handler)
        logging.root.handlers[:] = root_handlers
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    proc = subprocess.CompletedProcess(["vlp", *map(str, args)], code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"vlp {args[0]} failed ({code}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> Path:
    """The shapes data `vlp demo` makes (train, held-out and eval layouts), made once per session; a
    test links it as ``<out>/data`` and the demo and replication scripts find it up to date."""
    from vlp.demo import make_demo_data

    data = tmp_path_factory.mktemp("demo") / "data"
    make_demo_data(data, 0)
    return data


TINY_WORDS = (  # noqa: SIM905 - a readable vocabulary
    "[PAD] [UNK] [CLS] [SEP] [MASK] a an the of and with , red green blue yellow black white apple dog cat "
    "tree house car star flower drawing illustration icon circle square triangle two three big small"
).split()


@pytest.fixture(scope="session")
def tiny_hf_text(tmp_path_factory) -> Path:
    """A randomly initialised 2-layer BERT and its word-level tokenizer, saved as a Hugging Face folder
    (what ``save_pretrained`` writes), standing in for a real sentence model such as all-MiniLM-L6-v2."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder = tmp_path_factory.mktemp("tiny_bert")
    vocab = folder / "vocab.txt"
    vocab.write_text("\n".join(TINY_WORDS) + "\n")
    BertTokenizer(str(vocab)).save_pretrained(folder)
    config = BertConfig(
        vocab_size=len(TINY_WORDS),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    import torch

    torch.manual_seed(0)
    BertModel(config).save_pretrained(folder)
    return folder


def tiny_tower_sets(hf_folder, *extra: str) -> list[str]:
    """``--set`` overrides of a `custom` model: timm's tiny ``test_efficientnet`` (random init) and
    the tiny BERT folder, both locked, 32-d embeddings."""
    return [
        "model.name=custom",
        "model.embed_dim=32",
        "model.vision.timm_model_name=test_efficientnet",
        "model.vision.image_size=64",
        "model.vision.lock=true",
        f"model.text.hf_model_name_or_path={hf_folder}",
        "model.text.context_length=16",
        "model.text.lock=true",
        *extra,
    ]


@pytest.fixture(scope="session")
def _s3_session():
    """moto's S3 server on 127.0.0.1 behind a proxy the tests control (tests/s3_server.py)."""
    pytest.importorskip("moto.server", reason="moto[server] is in the dev extra: pip install -e '.[dev]'")
    pytest.importorskip("s3fs", reason="s3fs is in the dev extra: pip install -e '.[dev]'")
    from tests.s3_server import start

    server, stop = start()
    yield server
    stop()


@pytest.fixture()
def s3_server(_s3_session, monkeypatch):
    """The S3 server with this process's clients pointed at it; the proxy is up again after the test."""
    from tests.s3_server import apply_env

    apply_env(_s3_session, monkeypatch)
    _s3_session.proxy.restore()
    yield _s3_session
    _s3_session.proxy.restore()
