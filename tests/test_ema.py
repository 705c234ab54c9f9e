"""Weight EMA (``train.ema``): the average a hand computation gives, its warm-up and update cadence,
exact resume, two DDP processes against one, ZeRO-1/2 and FSDP2 against DDP, evaluation beside the
live weights, ``vlp export --weights ema`` in every format, ``vlp.load_model(weights="ema")``, and
the one-line refusals."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import vlp
from tests.conftest import REPO, run_main
from tests.distributed import backend_run_sets, run_distributed, torchrun_cmd
from vlp.checkpoint import CheckpointError, read_file, resolve
from vlp.checkpoint.kinds import select_weights
from vlp.config import ConfigError, load_config
from vlp.config.tree import EMAConfig
from vlp.train.ema import ModuleWeights, WeightEMA
from vlp.train.logging import read_metrics

DECAY = 0.5  # far from 1, so that every update shows


def _trainer(out, *sets):
    from vlp.train.trainer import Trainer

    overrides = [
        "model.name=debug", "train.device=cpu", f"train.output_dir={out}", "train.steps=100", "train.warmup_steps=1",
        "eval.tasks=[]", "data.val_shards=[]", f"train.ema.decay={DECAY}", *sets,
    ]  # fmt: skip
    return Trainer(load_config(None, overrides))


def _batch(trainer, n: int, seed: int) -> dict:
    from vlp.models.registry import context_length, image_size

    g = torch.Generator().manual_seed(seed)
    size, ctx = image_size(trainer.model), context_length(trainer.model)
    pixels = torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8)
    text = torch.randint(1, trainer.model.vocab_size - 1, (n, ctx), generator=g)
    return {"image": pixels, "text": text, "caption": [""] * n}


def _trainable(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_close(got: dict, want: dict, atol: float) -> None:
    assert got.keys() == want.keys()
    for k, v in want.items():
        assert torch.allclose(got[k].reshape(v.shape).float(), v.float(), atol=atol), (k, (got[k] - v).abs().max())


# ---- one process ------------------------------------------------------------------------------


def test_ema_equals_a_hand_computed_average_over_three_steps(tmp_path):
    trainer = _trainer(tmp_path / "run", "data.batch_size=8")
    want = _trainable(trainer.model)  # warmup 0: the EMA starts from the initial weights
    for step in (1, 2, 3):
        _, _, updated = trainer.train_step([_batch(trainer, 8, seed=step)])
        assert updated
        live = _trainable(trainer.model)
        want = {k: DECAY * want[k] + (1 - DECAY) * live[k] for k in want}
    got = trainer.ema.full_state()
    _assert_close(got, want, atol=1e-6)
    assert all(v.dtype == torch.float32 for v in got.values())

    # evaluation sees the EMA inside the block, the live weights after it
    with trainer.ema.applied(trainer.full_model) as model:
        _assert_close(_trainable(model), want, atol=1e-6)
    _assert_close(_trainable(trainer.model), live, atol=0)


def test_warmup_starts_the_ema_and_every_spaces_the_updates():
    layer = torch.nn.Linear(2, 2)
    with torch.no_grad():
        layer.weight.fill_(-1.0)
    ema = WeightEMA(EMAConfig(decay=0.5, warmup=2, every=2), ModuleWeights(layer))
    seen = []
    for step in range(1, 7):
        with torch.no_grad():
            layer.weight.fill_(float(step))
        ema.after_step(step)
        seen.append(float(ema.full_state()["weight"][0, 0]))
    # before step 2: the initial weights; step 2: set to the weights; 4 and 6: averaged; 3 and 5: kept
    assert seen == [-1.0, 2.0, 2.0, 3.0, 3.0, 4.5]


def test_what_cannot_run_is_refused_in_one_line():
    from vlp.train.backends import check_supported

    def check(*sets):
        check_supported(load_config(None, list(sets)), extra_captions=False, teacher=False)

    with pytest.raises(ConfigError, match=r"'train.ema.decay' = 1.0 must be in \[0, 1\)"):
        check("train.ema.decay=1.0")
    with pytest.raises(ConfigError, match="'train.ema.every' = 0 must be >= 1"):
        check("train.ema.decay=0.9", "train.ema.every=0")
    with pytest.raises(ConfigError, match="zero_stage=3: ZeRO-3 saves vlp's state once per rank") as e:
        check("train.ema.decay=0.9", "train.backend=deepspeed", "train.deepspeed.zero_stage=3")
    assert "\n" not in str(e.value)
    check("train.backend=deepspeed", "train.deepspeed.zero_stage=3")  # EMA off: nothing to refuse


# ---- DDP: two gloo processes against one -----------------------------------------------------


def _ddp_rank(rank, world, out):
    from vlp.distributed import DistEnv
    from vlp.train.trainer import Trainer

    overrides = [
        "model.name=debug", "train.device=cpu", f"train.output_dir={out}/{rank}", "train.steps=100",
        "train.warmup_steps=1", "eval.tasks=[]", "data.val_shards=[]", f"train.ema.decay={DECAY}",
        "train.backend=ddp", "data.batch_size=8",
    ]  # fmt: skip
    trainer = Trainer(load_config(None, overrides), env=DistEnv(rank=rank, world=world))
    for step in (1, 2, 3):
        full = _batch(trainer, 8 * world, seed=step)
        own = {k: v[rank * 8 : (rank + 1) * 8] for k, v in full.items()}
        trainer.train_step([own])
    return trainer.ema.full_state()


def test_two_ddp_processes_average_as_one_process_with_their_batch(tmp_path):
    per_rank = run_distributed(_ddp_rank, 2, str(tmp_path))
    single = _trainer(tmp_path / "one", "data.batch_size=16")
    for step in (1, 2, 3):
        single.train_step([_batch(single, 16, seed=step)])
    want = single.ema.full_state()
    for got in per_rank:
        _assert_close(got, want, atol=1e-5)


# ---- through the CLI: resume, evaluation, export, load_model ---------------------------------


def _sets(shards, out, *extra):
    base = [
        f"data.train_shards=['{shards['train']}']", f"data.val_shards=['{shards['val']}']", "data.batch_size=16",
        "data.workers=0", "data.shuffle_buffer=64", f"train.output_dir={out}", "train.steps=4",
        "train.warmup_steps=1", "train.log_every=1", "train.checkpoint_every=2", "eval.data=[]",
        "eval.tasks=[zeroshot_retrieval]", f"train.ema.decay={DECAY}", *extra,
    ]  # fmt: skip
    return ["--config", "configs/demo.yaml", *[a for s in base for a in ("--set", s)]]


@pytest.mark.slow
def test_resume_evaluation_export_and_load_model(shapes_shards, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    run_main("train", *_sets(shapes_shards, full))
    records = read_metrics(full / "metrics.jsonl")
    final = [r for r in records if "eval_ema/zeroshot_retrieval/image_retrieval_recall@1" in r]
    assert final and "eval/zeroshot_retrieval/image_retrieval_recall@1" in final[-1]

    # killed after its step-2 checkpoint: the resumed run's EMA is the uninterrupted one's
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_00000004.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000002.pt")
    proc = run_main("train", *_sets(shapes_shards, cut), "--resume", "latest")
    assert "(step 2)" in proc.stdout
    want = read_file(full / "checkpoints" / "step_00000004.pt")
    got = read_file(cut / "checkpoints" / "step_00000004.pt")
    assert want["ema"]["decay"] == DECAY and want["ema"]["weights"].keys() == got["ema"]["weights"].keys()
    _assert_close(got["ema"]["weights"], want["ema"]["weights"], atol=1e-6)
    ema = want["ema"]["weights"]
    assert any(not torch.equal(v, want["model"][k]) for k, v in ema.items())  # not the live weights

    # load_model and every export format give the EMA weights
    ckpt = full / "checkpoints" / "step_00000004.pt"
    model, _, _ = vlp.load_model(str(ckpt), weights="ema")
    expected = {**want["model"], **{k: v.reshape(want["model"][k].shape) for k, v in ema.items()}}
    _assert_close(model.state_dict(), expected, atol=0)
    for fmt in ("safetensors", "open_clip", "hf"):
        out = tmp_path / fmt
        info = run_main("export", "--checkpoint", ckpt, "--format", fmt, "--out", out, "--weights", "ema", "--check")
        assert "check: max abs diff" in info.stdout
        assert json.loads((out / "export.json").read_text())["weights"] == "ema"
        exported, _, _ = vlp.load_model(str(out / "model.safetensors" if fmt == "safetensors" else out))
        for k, v in ema.items():
            assert torch.allclose(exported.state_dict()[k].float(), v.reshape(expected[k].shape), atol=1e-6), (fmt, k)

    # asking for an EMA that is not there: one line
    plain = tmp_path / "plain"
    run_main("train", *_sets(shapes_shards, plain, "train.ema.decay=0", "train.steps=2", "eval.tasks=[]"))
    with pytest.raises(CheckpointError, match="no EMA weights in this checkpoint .trained without train.ema.") as e:
        vlp.load_model(str(plain / "checkpoints" / "step_00000002.pt"), weights="ema")
    assert "\n" not in str(e.value)
    with pytest.raises(CheckpointError, match="not a training checkpoint"):
        vlp.load_model("debug", weights="ema")
    proc = run_main("export", "--checkpoint", plain / "checkpoints" / "step_00000002.pt", "--format", "safetensors",
                    "--out", tmp_path / "none", "--weights", "ema", check=False)  # fmt: skip
    assert proc.returncode == 2 and "no EMA weights" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


# ---- ZeRO-1/2 and FSDP2 against DDP (torchrun, 2 gloo processes) --------------------------------


def _torchrun(shards, out, *extra, resume=False):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    args = ["--config", "configs/demo.yaml", *backend_run_sets(shards, out, f"train.ema.decay={DECAY}", *extra)]
    args += ["--resume", "latest"] if resume else []
    proc = subprocess.run(torchrun_cmd("vlp.train", args, 2), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def _ema_of(path) -> tuple[dict, dict]:
    """The EMA a checkpoint holds, and the full state dict ``weights="ema"`` loads."""
    found = resolve(path)
    return found.checkpoint["ema"]["weights"], select_weights(found, "ema").state_dict


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="DeepSpeed is not installed")
def test_zero_1_2_and_fsdp_average_as_ddp(shapes_shards, tmp_path):
    ddp = tmp_path / "ddp"
    _torchrun(shapes_shards, ddp)
    want, _ = _ema_of(ddp / "checkpoints" / "step_00000003.pt")
    zero2 = ("train.backend=deepspeed", "train.deepspeed.zero_stage=2")
    # evaluated too: the EMA copied into FSDP's full replica, and into ZeRO-1's bf16 module below
    evaluated = ("eval.tasks=[zeroshot_retrieval]", f"eval.data=['{shapes_shards['val']}']")
    for name, extra in (("zero2", zero2), ("fsdp", ("train.backend=fsdp", *evaluated))):
        out = tmp_path / name
        proc = _torchrun(shapes_shards, out, *extra)
        assert "weight EMA, decay 0.5" in proc.stdout
        got, loaded = _ema_of(out / "checkpoints")
        _assert_close(got, want, atol=2e-5)
        model, _, _ = vlp.load_model(str(out / "checkpoints"), weights="ema")
        for k, v in want.items():
            assert torch.allclose(model.state_dict()[k].reshape(v.shape), v, atol=2e-5), (name, k)
        assert loaded.keys() == model.state_dict().keys()

    # ZeRO-1 in bf16, the EMA set to the weights at step 3 (warmup 3): the fp32 master weights, not the
    # module's bf16 copy
    zero1 = ("train.backend=deepspeed", "train.deepspeed.zero_stage=1", "model.precision=bf16", "train.ema.warmup=3")
    _torchrun(shapes_shards, tmp_path / "zero1", *zero1, *evaluated)
    for name in ("fsdp", "zero1"):
        records = read_metrics(tmp_path / name / "metrics.jsonl")
        assert any("eval_ema/zeroshot_retrieval/image_retrieval_recall@1" in r for r in records), name
    got, _ = _ema_of(tmp_path / "zero1" / "checkpoints")
    master = resolve(tmp_path / "zero1" / "checkpoints").state_dict  # consolidated from the fp32 partitions
    _assert_close(got, {k: master[k] for k in got}, atol=0)
    assert not all(torch.equal(v, v.bfloat16().float()) for v in got.values())

    # ZeRO-2 killed after its step-2 checkpoint resumes to the same EMA (the fragments are cut from the full one)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "zero2", cut)
    shutil.rmtree(cut / "checkpoints" / "step_00000003")
    (cut / "checkpoints" / "latest").write_text("step_00000002")
    assert "(step 2)" in _torchrun(shapes_shards, cut, *zero2, resume=True).stdout
    got, _ = _ema_of(cut / "checkpoints")
    _assert_close(got, _ema_of(tmp_path / "zero2" / "checkpoints")[0], atol=1e-6)


# ---- FSDP2 shards: gathered and cut back -------------------------------------------------------


def _fsdp_round_trip(rank, world):
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Linear(5, 3))  # 5 rows: uneven shards
    full = {n: p.detach().clone() for n, p in model.named_parameters()}
    fully_shard(model)
    weights = ModuleWeights(model)
    gathered = weights.gather(weights.pieces())
    doubled = weights.gather(weights.split({k: 2 * v for k, v in gathered.items()}))
    return full, gathered, doubled


def test_fsdp_shards_gather_and_split_back():
    for full, gathered, doubled in run_distributed(_fsdp_round_trip, 2):
        _assert_close(gathered, full, atol=0)
        _assert_close(doubled, {k: 2 * v for k, v in full.items()}, atol=0)


# ---- the benchmark's EMA on/off comparison -----------------------------------------------------


@pytest.mark.slow
def test_train_step_benchmark_measures_the_ema(tmp_path):
    out = tmp_path / "ts.json"
    cmd = [sys.executable, "tools/bench/train_step.py", "--quick", "--device", "cpu", "--ema", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-4000:]
    (row,) = json.loads(out.read_text())["rows"]
    assert row["vlp_ema"]["samples_per_s"] > 0 and row["ema_cost"] > 0 and row["ema_update_ms"] > 0
    assert "EMA" in proc.stdout


def test_a_step_the_fp16_grad_scaler_skips_leaves_the_ema_alone(tmp_path):
    trainer = _trainer(tmp_path / "run", "data.batch_size=8", "model.precision=fp16")
    scaler = trainer.backend.scaler
    assert scaler.is_enabled()
    trainer.train_step([_batch(trainer, 8, seed=1)])
    before_live = _trainable(trainer.model)
    before_ema = {k: v.clone() for k, v in trainer.ema.full_state().items()}  # (the EMA's own tensors)
    scaler.update(new_scale=3e38)  # the scaled loss's gradients overflow: the scaler skips the update
    _, _, updated = trainer.train_step([_batch(trainer, 8, seed=2)])
    assert updated  # the step counts (the schedule moves on), as open_clip counts it
    assert scaler.get_scale() < 3e38 and not trainer.backend.step_applied
    _assert_close(_trainable(trainer.model), before_live, atol=0)
    _assert_close(trainer.ema.full_state(), before_ema, atol=0)
    scaler.update(new_scale=2.0**10)  # a finite step again: the EMA moves on
    trainer.train_step([_batch(trainer, 8, seed=3)])
    live = _trainable(trainer.model)
    want = {k: DECAY * before_ema[k].reshape(v.shape) + (1 - DECAY) * v for k, v in live.items()}
    assert trainer.backend.step_applied
    _assert_close(trainer.ema.full_state(), want, atol=1e-6)
