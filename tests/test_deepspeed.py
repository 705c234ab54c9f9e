"""DeepSpeed backend: the generated JSON, ZeRO 1/2/3 on 2 gloo processes against DDP, resume,
bf16 with the logit-scale clamp on the fp32 master copy, and consolidation of the shards."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.distributed import backend_run_sets, torchrun_cmd
from vlp.config import ConfigError, load_config
from vlp.train.deepspeed_config import build_config, generated_config
from vlp.train.logging import read_metrics

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed: pip install 'vlp[deepspeed]'"
)


def _cfg(*sets):
    return load_config("configs/demo.yaml", ["train.backend=deepspeed", *sets])


def test_generated_config_follows_vlp_config():
    ds = generated_config(
        _cfg(
            "data.batch_size=24",
            "train.accum_steps=3",
            "train.grad_clip=0.5",
            "model.precision=bf16",
            "train.deepspeed.zero_stage=3",
        ),
        world=4,
    )
    assert ds["train_micro_batch_size_per_gpu"] == 24 and ds["gradient_accumulation_steps"] == 3
    assert ds["train_batch_size"] == 24 * 3 * 4 and ds["gradient_clipping"] == 0.5
    assert ds["zero_optimization"] == {"stage": 3}
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    fp16 = generated_config(_cfg("model.precision=fp16"), world=1)["fp16"]
    assert fp16["enabled"] and fp16["loss_scale"] == 0  # dynamic loss scaling


def test_user_json_merged_and_conflicts_refused(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(
        json.dumps(
            {
                "zero_optimization": {"stage": "auto", "reduce_bucket_size": 1000},
                "train_micro_batch_size_per_gpu": 16,
                "communication_data_type": "fp32",
            }
        )
    )
    merged = build_config(
        _cfg("data.batch_size=16", "train.deepspeed.zero_stage=2", f"train.deepspeed.config={path}"), 2
    )
    assert merged["zero_optimization"] == {"stage": 2, "reduce_bucket_size": 1000}
    assert merged["communication_data_type"] == "fp32" and merged["train_batch_size"] == 32

    with pytest.raises(
        ConfigError, match=r"'train_micro_batch_size_per_gpu' = 16 contradicts .*data.batch_size gives 8"
    ):
        build_config(_cfg("data.batch_size=8", f"train.deepspeed.config={path}"), 1)
    path.write_text(json.dumps({"optimizer": {"type": "Adam", "params": {"lr": 1e-3}}}))
    with pytest.raises(ConfigError, match="remove the 'optimizer' section.*train.lr"):
        build_config(_cfg(f"train.deepspeed.config={path}"), 1)
    path.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        build_config(_cfg(f"train.deepspeed.config={path}"), 1)


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "deepspeed").glob("*.json")))
def test_shipped_deepspeed_jsons_merge(name):
    path = REPO / "configs" / "deepspeed" / name
    stage = json.loads(path.read_text())["zero_optimization"]["stage"]
    stage = 2 if stage == "auto" else stage
    merged = build_config(_cfg(f"train.deepspeed.zero_stage={stage}", f"train.deepspeed.config={path}"), 8)
    assert merged["zero_optimization"]["stage"] == stage


def test_zero3_refuses_what_it_would_train_wrongly():
    from vlp.train.deepspeed_backend import check_supported

    with pytest.raises(ConfigError, match="momentum teacher"):
        check_supported(_cfg("loss.distill.enabled=true", "loss.distill.queue_size=0"), 3)
    with pytest.raises(ConfigError, match="extra captions"):
        check_supported(_cfg("data.negatives.k=2"), 3)
    check_supported(_cfg("loss.distill.enabled=true"), 2)  # fine below stage 3


# ---- real runs: torchrun on 2 CPU processes ---------------------------------------------------


_sets = backend_run_sets


def _run(args, nproc=2):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = torchrun_cmd("vlp.train", args, nproc) if nproc > 1 else [sys.executable, "-m", "vlp.train", *args]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_zero_stages_match_ddp_and_resume(shapes_shards, tmp_path):
    ddp = tmp_path / "ddp"
    _run(["--config", "configs/demo.yaml", *_sets(shapes_shards, ddp)])
    reference = _losses(ddp)
    assert sorted(reference) == [1, 2, 3]
    # ZeRO-1 shards only what ZeRO-2 shards too (optimizer state); it runs in the bf16 test below
    for stage in (2, 3):
        out = tmp_path / f"zero{stage}"
        proc = _run(
            [
                "--config",
                "configs/demo.yaml",
                *_sets(shapes_shards, out, "train.backend=deepspeed", f"train.deepspeed.zero_stage={stage}"),
            ]
        )
        assert f"DeepSpeed ZeRO stage {stage}, 2 process(es)" in proc.stdout
        losses = _losses(out)
        for step in (1, 2, 3):
            assert losses[step] == pytest.approx(reference[step], abs=2e-5), (stage, losses, reference)
        ckpt = out / "checkpoints"
        assert (ckpt / "latest").read_text() == "step_00000003"
        assert sorted(p.name for p in ckpt.glob("step_*")) == ["step_00000002", "step_00000003"]

    # a ZeRO-2 run killed after its step-2 checkpoint (and during the step-3 save: no marker) resumes
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "zero2", cut)
    (cut / "checkpoints" / "step_00000003" / "vlp_complete.json").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000003")  # the pointer is written last: stale here
    proc = _run(
        [
            "--config",
            "configs/demo.yaml",
            *_sets(shapes_shards, cut, "train.backend=deepspeed", "train.deepspeed.zero_stage=2"),
            "--resume",
            "latest",
        ]
    )
    assert "resumed from" in proc.stdout and "(step 2)" in proc.stdout
    assert _losses(cut)[3] == pytest.approx(reference[3], abs=2e-5)


@pytest.mark.slow
def test_bf16_clamps_master_logit_scale_and_consolidates(shapes_shards, tmp_path):
    import torch

    import vlp
    from vlp.checkpoint.deepspeed import consolidated_state_dict

    out = tmp_path / "bf16"
    # the initial multiplier 1/0.07 = 14.3 is above the cap of 10: the clamp acts from the first step
    sets = _sets(
        shapes_shards,
        out,
        "train.backend=deepspeed",
        "train.deepspeed.zero_stage=1",
        "model.precision=bf16",
        "train.logit_scale_max=10",
        "train.steps=2",
        "train.lr=1e-5",
        "eval.tasks=[zeroshot_retrieval]",
        f"eval.data=['{shapes_shards['val']}']",
        "eval.batch_size=32",
    )
    sets = [a for a in sets if a != "eval.data=[]"]
    sets = [a for i, a in enumerate(sets) if not (a == "--set" and sets[i + 1] == "--set")]
    proc = _run(["--config", "configs/demo.yaml", *sets], nproc=1)
    assert "precision bf16" in proc.stdout
    records = read_metrics(out / "metrics.jsonl")
    assert [r["logit_scale"] for r in records if "loss" in r][-1] == pytest.approx(10, rel=1e-2)
    assert any("eval/zeroshot_retrieval/image_retrieval_recall@1" in r for r in records)  # bf16 module evaluates
    # the fp32 master copy (what the consolidated checkpoint holds) is clamped too, not only the module
    sd, client = consolidated_state_dict(out / "checkpoints")
    assert client["step"] == 2 and sd["logit_scale"].dtype == torch.float32
    assert float(sd["logit_scale"]) <= math.log(10) + 1e-6
    model, _, _ = vlp.load_model(str(out / "checkpoints" / "step_00000002"))
    # vlp export consolidates the shards and its parity check reloads the export
    from vlp.export import export_checkpoint

    info = export_checkpoint(out / "checkpoints", "open_clip", tmp_path / "exported", check=True)
    assert info["parity"]["ok"] and info["source_kind"] == "vlp DeepSpeed checkpoint"
    assert float(model.logit_scale.detach()) == pytest.approx(math.log(10), abs=1e-4)


def _unequal_batches(rank, world):
    import torch

    from vlp.losses.distributed import check_same_batch

    try:
        check_same_batch(torch.zeros(16 if rank == 0 else 12, 3, 8, 8))
    except RuntimeError as e:
        return {"error": str(e)}
    return {"error": ""}


def test_unequal_batches_fail_instead_of_hanging():
    from tests.distributed import run_distributed

    for result in run_distributed(_unequal_batches, 2):
        assert "different feature shapes" in result["error"] and "[16, 3, 8, 8]" in result["error"]


@pytest.mark.slow
def test_momentum_teacher_under_zero2_matches_single_process(shapes_shards, tmp_path):
    distill = ["loss.distill.enabled=true", "loss.distill.queue_size=64", "loss.distill.alpha_warmup_steps=0"]
    plain, zero = tmp_path / "plain", tmp_path / "zero2"
    _run(["--config", "configs/demo.yaml", *_sets(shapes_shards, plain, *distill)], nproc=1)
    _run(
        [
            "--config",
            "configs/demo.yaml",
            *_sets(shapes_shards, zero, *distill, "train.backend=deepspeed", "train.deepspeed.zero_stage=2"),
        ],
        nproc=1,
    )
    a, b = _losses(plain), _losses(zero)
    for step in (1, 2, 3):
        assert b[step] == pytest.approx(a[step], abs=2e-5), (a, b)
    import torch

    from vlp.checkpoint.deepspeed import weights_only_loads

    with weights_only_loads():
        state = torch.load(zero / "checkpoints" / "step_00000003" / "mp_rank_00_model_states.pt")
    assert int(state["teacher"]["ptr"]) == (3 * 16) % 64  # the queue and its pointer are in the checkpoint


def test_mpi_launch_without_rank_variables_is_refused(monkeypatch):
    from vlp.config import TrainConfig
    from vlp.train.backends import init_distributed

    for key in ("WORLD_SIZE", "RANK", "SLURM_PROCID"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    with pytest.raises(ConfigError, match="launched by MPI with 4 processes"):
        init_distributed(TrainConfig(device="cpu"))
