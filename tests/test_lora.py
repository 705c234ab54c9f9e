"""LoRA (``model.lora``): only the adapters (and the logit scale) train, the frozen weights never move,
2 DDP processes equal one process with the global batch (also accumulated), a resumed run equals an
uninterrupted one, and ``vlp export`` / ``vlp.load_model`` merge the adapters into a plain model with
the adapted model's features. What LoRA cannot be combined with is refused in one line."""

from __future__ import annotations

import contextlib
import json
import shutil

import open_clip
import pytest
import torch
import torch.nn.functional as F

import vlp
from tests.conftest import run_main
from tests.distributed import backend_run_sets, run_distributed
from vlp.checkpoint import CHECKPOINT_FORMAT, read_file, resolve
from vlp.config import ConfigError, LossConfig, TrainConfig, load_config
from vlp.distributed import DistEnv
from vlp.export import export_checkpoint, load_safetensors
from vlp.losses import Objective
from vlp.models import lora
from vlp.models.registry import build_model
from vlp.train.backends import check_supported
from vlp.train.logging import read_metrics
from vlp.train.optim import build_optimizer
from vlp.train.plain_backend import wrap_model
from vlp.train.step import forward_backward

CPU = torch.device("cpu")
RANK, ALPHA = 4, 8.0
SETS = [f"model.lora.rank={RANK}", f"model.lora.alpha={ALPHA}"]


def _lora_model(*sets: str, adapters_seed: int | None = 1):
    """The debug CLIP with rank-4 adapters; with ``adapters_seed`` the B matrices are random too (peft
    starts them at zero), so the adapters change the features and every adapter gets a gradient."""
    cfg = load_config(None, [*SETS, *sets])
    torch.manual_seed(0)
    model = build_model(cfg.model)[0]
    if adapters_seed is not None:
        g = torch.Generator().manual_seed(adapters_seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if ".lora_B." in name:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model, cfg


def _inputs(n=3, seed=2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 64, 64, generator=g), torch.randint(1, 49000, (n, 32), generator=g)


def _features(model, pixels, ids):
    model.eval()
    with torch.no_grad():
        return model.encode_image(pixels), model.encode_text(ids)


def _max_diff(a, b) -> float:
    return max(float((x - y).abs().max()) for x, y in zip(a, b))


# ---- the adapted model ------------------------------------------------------------------------


def test_only_adapters_and_logit_scale_train_and_the_start_is_the_base_model():
    model, _ = _lora_model(adapters_seed=None)
    torch.manual_seed(0)
    plain = build_model("debug")[0]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert "logit_scale" in trainable and all(".lora_" in n for n in trainable if n != "logit_scale")
    # default targets: each block's attention (its q/k/v and output projections) and its two MLP layers
    layers = {n.split(".lora_")[0] for n in trainable if n != "logit_scale"}
    assert len(layers) == 2 * 2 * 4  # 2 towers x 2 blocks x (in_proj, out_proj, c_fc, c_proj)
    assert lora.describe(model, RANK) == "LoRA rank 4 on 12 layers: 12,289 trainable of 3,335,425 parameters (0.37%)"
    assert type(model) is type(plain) and hasattr(model, "encode_image")  # still the open_clip module
    pixels, ids = _inputs()
    assert _max_diff(_features(model, pixels, ids), _features(plain, pixels, ids)) < 1e-6  # B = 0: the base model

    frozen_scale, _ = _lora_model("model.lora.train_logit_scale=false", adapters_seed=None)
    assert all(".lora_" in n for n, p in frozen_scale.named_parameters() if p.requires_grad)


def test_frozen_weights_never_move_and_stay_the_same_parameters():
    """peft 0.21 adapts nn.MultiheadAttention by merging before and unmerging after each forward,
    which rounds (W + BA) - BA back into the frozen weights and re-creates their Parameters; vlp's
    attention layer passes W + BA to the forward instead."""
    model, _ = _lora_model()
    base = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k and k != "logit_scale"}
    ids_before = {n: id(p) for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, TrainConfig(lr=1e-2))
    pixels, ids = _inputs(8)
    for _ in range(5):
        model.train()
        out = model(pixels, ids)
        loss = -(out["image_features"] * out["text_features"]).sum() * out["logit_scale"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    after = model.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in base.items())
    assert ids_before == {n: id(p) for n, p in model.named_parameters()}


def test_merge_adds_the_scaled_low_rank_update_once_and_gives_the_plain_model():
    model, _ = _lora_model()
    pixels, ids = _inputs()
    adapted = _features(model, pixels, ids)
    sd = model.state_dict()
    # by hand: W + alpha/r * B A for every adapted weight (peft 0.21's own attention merge adds the
    # output projection's update twice: huggingface/peft#3774)
    want = {k.replace(".base_layer", ""): v.clone() for k, v in sd.items() if ".lora_" not in k}
    for key in sd:
        if key.endswith(".lora_A.default.weight"):
            layer = key.removesuffix(".lora_A.default.weight")
            update = (ALPHA / RANK) * sd[f"{layer}.lora_B.default.weight"] @ sd[key]
            weight = f"{layer}.in_proj_weight" if layer.endswith(".attn") else f"{layer}.weight"
            want[weight.replace(".base_layer", "")] += update
    merged = lora.merge_lora(model)
    torch.manual_seed(0)
    plain = build_model("debug")[0]
    assert list(merged.state_dict()) == list(plain.state_dict()) and not lora.has_lora(merged)
    assert all(p.requires_grad for p in merged.parameters())
    got = merged.state_dict()
    assert all(torch.allclose(got[k], want[k], atol=1e-6, rtol=0) for k in want), [
        k for k in want if not torch.allclose(got[k], want[k], atol=1e-6, rtol=0)
    ]
    assert _max_diff(_features(merged, pixels, ids), adapted) < 1e-5
    plain.load_state_dict(got)  # the plain architecture takes the merged weights strictly
    assert _max_diff(_features(plain, pixels, ids), adapted) < 1e-5


def test_base_weights_come_from_model_pretrained(tmp_path):
    torch.manual_seed(3)
    donor = build_model("debug")[0]
    torch.save(donor.state_dict(), tmp_path / "base.pt")
    model, _ = _lora_model(f"model.pretrained={tmp_path / 'base.pt'}", adapters_seed=None)
    sd = {k.replace(".base_layer", ""): v for k, v in model.state_dict().items() if ".lora_" not in k}
    assert all(torch.equal(v, sd[k]) for k, v in donor.state_dict().items())


# ---- configuration and refusals ----------------------------------------------------------------


@pytest.mark.parametrize(
    "sets, key",
    [
        (["model.lora.rank=-1"], "model.lora.rank"),
        (["model.lora.rank=4", "model.lora.targets=[]"], "model.lora.targets"),
        (["model.lora.rank=4", "model.lora.dropout=1.0"], "model.lora.dropout"),
        (["model.lora.rank=4", "model.lora.alpha=0"], "model.lora.alpha"),
        (["model.lora.rank=4", "model.vision.lock=true"], "model.vision.lock"),
        (["model.lora.rank=4", "model.itm_head=true"], "model.itm_head"),
    ],
)
def test_config_values_are_checked(sets, key):
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_config(None, sets)


@pytest.mark.parametrize(
    "target, message",
    [
        ("qkv", "'qkv' matches no linear or attention layer of debug; its layer names: attn, c_fc, c_proj"),
        ("out_proj", "output projection of nn.MultiheadAttention"),
    ],
)
def test_a_target_that_adapts_nothing_is_a_clear_error(target, message):
    cfg = load_config(None, [*SETS, f"model.lora.targets=[c_fc,{target}]"])
    with pytest.raises(ConfigError, match="model.lora.targets") as e:
        build_model(cfg.model)
    assert message in str(e.value)


def test_zero3_with_lora_is_refused_in_one_line(tmp_path):
    cfg = load_config(None, [*SETS, "train.backend=deepspeed", "train.deepspeed.zero_stage=3"])
    with pytest.raises(ConfigError, match="zero_stage=3 with model.lora"):
        check_supported(cfg, extra_captions=False, teacher=False)
    check_supported(load_config(None, [*SETS, "train.backend=deepspeed"]), extra_captions=False, teacher=False)
    sets = [*SETS, "train.backend=deepspeed", "train.deepspeed.zero_stage=3", f"train.output_dir={tmp_path / 'r'}"]
    proc = run_main("train", *[a for s in sets for a in ("--set", s)], check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("vlp train: error:")]
    assert proc.returncode == 2 and len(errors) == 1 and "use zero_stage 1 or 2" in errors[0], proc.stderr


# ---- distributed and accumulated steps ---------------------------------------------------------

WORLD, GLOBAL, STEPS = 2, 16, 3
TRAIN = TrainConfig(lr=1e-2, weight_decay=0.1)


def _global_batches(step):
    g = torch.Generator().manual_seed(100 + step)
    return {
        "image": torch.randn(GLOBAL, 3, 64, 64, generator=g, dtype=torch.float64),
        "text": torch.randint(1, 49000, (GLOBAL, 32), generator=g),
        "caption": [""] * GLOBAL,
    }


def _micro(batch, parts, first, count):
    """Micro-batches ``first .. first+count-1`` of ``batch`` cut in ``parts`` equal row blocks."""
    size = GLOBAL // parts
    rows = [slice(i * size, (i + 1) * size) for i in range(first, first + count)]
    return [{k: v[r] for k, v in batch.items()} for r in rows]


def _train(model, micro_of_step):
    """STEPS AdamW steps; each step's micro-batches from ``micro_of_step(step)``."""
    optimizer = build_optimizer(model.module if hasattr(model, "module") else model, TRAIN)
    losses = []
    for step in range(STEPS):
        optimizer.zero_grad(set_to_none=True)
        loss, _, _ = forward_backward(
            model, Objective(LossConfig()), micro_of_step(step), device=CPU, autocast=contextlib.nullcontext
        )
        optimizer.step()
        losses.append(loss)
    return torch.stack(losses)


def _trained_state(model):
    return {k: v.clone() for k, v in model.state_dict().items() if ".lora_" in k or k == "logit_scale"}


def _rank_run(rank, world):
    out = {}
    for k in (1, 2):  # micro-batches per step: 1, and exact accumulation of 2 half batches
        model = _lora_model()[0].double().train()
        ddp = wrap_model(model, DistEnv(rank=rank, world=world))
        losses = _train(ddp, lambda step, k=k: _micro(_global_batches(step), world * k, rank * k, k))
        out[k] = {"losses": losses, "state": _trained_state(model)}
    return out


def test_two_processes_equal_one_process_with_the_global_batch_also_accumulated():
    per_rank = run_distributed(_rank_run, WORLD)
    reference = _lora_model()[0].double().train()
    base = {k: v.clone() for k, v in reference.state_dict().items() if ".lora_" not in k and k != "logit_scale"}
    want_losses = _train(reference, lambda step: [_global_batches(step)])
    want = _trained_state(reference)
    assert not any(torch.equal(v, _lora_model()[0].double().state_dict()[k]) for k, v in want.items())  # they moved
    assert all(torch.equal(v, reference.state_dict()[k]) for k, v in base.items())
    for rank, result in enumerate(per_rank):
        for k, got in result.items():
            assert torch.allclose(got["losses"], want_losses, atol=1e-9, rtol=0), (rank, k, got["losses"], want_losses)
            for name, value in want.items():
                assert torch.allclose(got["state"][name], value, atol=1e-9, rtol=0), (rank, k, name)


# ---- checkpoints, export, load_model -----------------------------------------------------------


@pytest.fixture(scope="module")
def lora_ckpt(tmp_path_factory):
    """A checkpoint as the trainer saves it (format, model with adapters, config), adapters non-zero."""
    model, cfg = _lora_model()
    path = tmp_path_factory.mktemp("lora") / "step_00000001.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "step": 1, "model": model.state_dict(), "config": cfg.to_dict()}, path)
    return path


@pytest.fixture(scope="module")
def adapted(lora_ckpt):
    """The checkpoint's adapted (unmerged) model's features on fixed inputs, and a plain model's."""
    found = resolve(lora_ckpt)
    assert found.model_cfg.lora.rank == RANK and any(".lora_A." in k for k in found.state_dict)
    model = build_model(found.model_cfg)[0]
    model.load_state_dict(found.state_dict)  # strictly: the saved config rebuilds the adapted architecture
    pixels, ids = _inputs()
    torch.manual_seed(0)
    base_only = _features(build_model("debug")[0], pixels, ids)
    features = _features(model, pixels, ids)
    assert _max_diff(features, base_only) > 1e-2  # the adapters matter, so the comparisons below do
    return {"pixels": pixels, "ids": ids, "features": features}


def test_load_model_merges_the_adapters(lora_ckpt, adapted):
    model, _, tokenizer = vlp.load_model(str(lora_ckpt))
    assert not lora.has_lora(model) and not any(".lora_" in k or "base_layer" in k for k in model.state_dict())
    assert _max_diff(_features(model, adapted["pixels"], adapted["ids"]), adapted["features"]) < 1e-5


def test_safetensors_export_is_the_merged_plain_model(lora_ckpt, adapted, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "st"
    proc = run_main("export", "--checkpoint", lora_ckpt, "--format", "safetensors", "--out", out, "--check")
    assert "check: max abs diff" in proc.stdout
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        meta = json.loads(f.metadata()["model_config"])
        keys = set(f.keys())
    assert meta["lora"]["rank"] == 0  # the metadata describes the plain model it holds
    torch.manual_seed(0)
    assert keys == set(build_model("debug")[0].state_dict())
    model, _, _ = load_safetensors(out / "model.safetensors")
    assert _max_diff(_features(model, adapted["pixels"], adapted["ids"]), adapted["features"]) < 1e-5


def test_open_clip_folder_export_loads_in_open_clip_with_the_adapted_features(lora_ckpt, adapted, tmp_path):
    out = tmp_path / "oc"
    export_checkpoint(lora_ckpt, "open_clip", out)
    model = open_clip.create_model(f"local-dir:{out}").eval()
    with torch.no_grad():
        img = F.normalize(model.encode_image(adapted["pixels"]), dim=-1)
        txt = F.normalize(model.encode_text(adapted["ids"]), dim=-1)
    assert _max_diff((img, txt), adapted["features"]) < 1e-5


# ---- real runs through the CLI -----------------------------------------------------------------


def _losses(out):
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow
def test_lora_run_checkpoints_the_adapters_and_resumes_exactly(shapes_shards, tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    extra = (*SETS, "train.steps=4", "train.lr=1e-2")
    proc = run_main("train", "--config", "configs/demo.yaml", *backend_run_sets(shapes_shards, full, *extra))
    line = [s for s in proc.stdout.splitlines() if s.startswith(f"vlp: LoRA rank {RANK} on 12 layers")]
    assert len(line) == 1 and "(0.37%)" in line[0], proc.stdout
    state = read_file(full / "checkpoints" / "step_00000004.pt")
    assert state["config"]["model"]["lora"]["rank"] == RANK
    assert sum(".lora_" in k for k in state["model"]) == 32
    trainable = sum(p.numel() for k, p in state["model"].items() if ".lora_" in k or k == "logit_scale")
    assert sum(s["exp_avg"].numel() for s in state["optimizer"]["state"].values()) == trainable

    # a run killed after its step-2 checkpoint resumes to the same losses and weights
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_00000004.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000002.pt")
    sets = backend_run_sets(shapes_shards, cut, *extra)
    proc = run_main("train", "--config", "configs/demo.yaml", *sets, "--resume", "latest")
    assert "(step 2)" in proc.stdout
    a, b = _losses(full), _losses(cut)
    assert all(b[s] == pytest.approx(a[s], abs=1e-6) for s in (3, 4)), (a, b)
    resumed = read_file(cut / "checkpoints" / "step_00000004.pt")["model"]
    assert all(torch.allclose(resumed[k], v, atol=1e-6) for k, v in state["model"].items())


@pytest.mark.slow
def test_lora_under_fsdp_and_zero2_matches_ddp(shapes_shards, tmp_path):
    import os
    import subprocess

    from tests.conftest import REPO
    from tests.distributed import torchrun_cmd

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    losses = {}
    for name, extra in {
        "ddp": (),
        "fsdp": ("train.backend=fsdp",),
        "zero2": ("train.backend=deepspeed", "train.deepspeed.zero_stage=2"),
    }.items():
        out = tmp_path / name
        args = ["--config", "configs/demo.yaml", *backend_run_sets(shapes_shards, out, *SETS, *extra)]
        proc = subprocess.run(torchrun_cmd("vlp.train", args), cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=300)  # fmt: skip
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
        losses[name] = _losses(out)
        if name != "ddp":  # the consolidated checkpoint: DDP's adapters, rebuilt and merged by load_model
            want = resolve(tmp_path / "ddp" / "checkpoints" / "step_00000003.pt").state_dict
            got = resolve(out / "checkpoints").state_dict
            assert all(torch.allclose(got[k].reshape(v.shape), v, atol=1e-5) for k, v in want.items()), name
            assert not lora.has_lora(vlp.load_model(str(out / "checkpoints"))[0])
    for name in ("fsdp", "zero2"):
        assert all(losses[name][s] == pytest.approx(losses["ddp"][s], abs=2e-5) for s in (1, 2, 3)), losses


def test_a_lora_checkpoint_as_model_pretrained_starts_from_it_merged(tmp_path):
    """A LoRA run's checkpoint can initialise the next run: its adapters are merged into the base."""
    from vlp.checkpoint import training_state
    from vlp.config import ModelConfig

    model, cfg = _lora_model()
    ckpt = tmp_path / "step_00000003.pt"
    torch.save(training_state(3, cfg.to_dict(), 1, model=model.state_dict()), ckpt)
    pixels, ids = _inputs()
    adapted = _features(model, pixels, ids)
    start = build_model(ModelConfig(name="debug", pretrained=str(ckpt)))[0]
    assert not lora.has_lora(start)
    assert _max_diff(_features(start, pixels, ids), adapted) < 1e-5
