"""FSDP2 backend (``train.backend: fsdp``) on 2 gloo processes against DDP: the same losses, the same
consolidated weights, exact resume, never from an incomplete folder, and its checkpoints read by
`vlp eval`, `vlp export` and `vlp.load_model`; what it cannot train is refused in one line."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch

from tests.conftest import REPO, run_main
from tests.distributed import backend_run_sets, torchrun_cmd
from vlp.config import ConfigError, load_config
from vlp.train.logging import read_metrics


def _sets(shards, out, *extra):
    return ["--config", "configs/demo.yaml", *backend_run_sets(shards, out, *extra)]


def _run(args):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(torchrun_cmd("vlp.train", args, 2), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_fsdp_matches_ddp_resumes_exactly_and_its_checkpoints_load_everywhere(shapes_shards, tmp_path):
    import vlp
    from vlp.checkpoint import read_file, resolve

    ddp, fsdp = tmp_path / "ddp", tmp_path / "fsdp"
    _run(_sets(shapes_shards, ddp))
    proc = _run(_sets(shapes_shards, fsdp, "train.backend=fsdp"))
    assert "FSDP2 (fully_shard), 2 process(es), precision fp32" in proc.stdout
    reference, losses = _losses(ddp), _losses(fsdp)
    assert sorted(losses) == [1, 2, 3]
    for step in (1, 2, 3):
        assert losses[step] == pytest.approx(reference[step], abs=2e-5), (losses, reference)
    ckpt = fsdp / "checkpoints"
    assert (ckpt / "latest").read_text() == "step_00000003"
    assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003"]

    # consolidated without a process group: the weights DDP reached, the logit scale a scalar again
    found = resolve(ckpt)
    assert found.kind == "vlp FSDP checkpoint" and found.checkpoint["step"] == 3
    want = read_file(ddp / "checkpoints" / "step_00000003.pt")["model"]
    assert found.state_dict.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(found.state_dict[k].reshape(v.shape), v, atol=1e-5), k
    model, _, _ = vlp.load_model(str(ckpt / "step_00000003"))
    assert model.logit_scale.dim() == 0

    info = run_main("export", "--checkpoint", ckpt, "--format", "safetensors", "--out", tmp_path / "st", "--check")
    assert "vlp FSDP checkpoint" in info.stdout and "check: max abs diff" in info.stdout
    ev = run_main("eval", "--checkpoint", ckpt, "--task", "zeroshot_retrieval", "--data", shapes_shards["val"],
                  "--output", tmp_path / "r.json", "--workers", "0")  # fmt: skip
    assert "image_retrieval_recall@1" in ev.stdout

    # killed after the step-2 checkpoint and during the step-3 save (no marker; `latest` not yet moved on
    # would say 2, a stale one 3): resumes from step 2 and reaches DDP's step-3 loss
    cut = tmp_path / "cut"
    shutil.copytree(fsdp, cut)
    (cut / "checkpoints" / "step_00000003" / "vlp_complete.json").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000003")
    proc = _run([*_sets(shapes_shards, cut, "train.backend=fsdp"), "--resume", "latest"])
    assert "resumed from" in proc.stdout and "(step 2)" in proc.stdout
    assert _losses(cut)[3] == pytest.approx(reference[3], abs=2e-5)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["loss.distill.enabled=true"], "momentum teacher"),
        (["data.negatives.k=2"], "extra captions"),
        (["model.precision=fp16"], "fp16"),
    ],
)
def test_what_fsdp_cannot_train_is_refused_in_one_line(shapes_shards, tmp_path, extra, message):
    args = _sets(shapes_shards, tmp_path / "run", "train.backend=fsdp", *extra)
    proc = run_main("train", *args, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp train: error:")]
    assert len(errors) == 1 and "train.backend=fsdp" in errors[0] and message in errors[0]


def test_fsdp_is_a_backend_choice():
    assert load_config(None, ["train.backend=fsdp"]).train.backend == "fsdp"
    with pytest.raises(ConfigError, match="train.backend"):
        load_config(None, ["train.backend=fsdp2"])
