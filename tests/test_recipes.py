"""The recipes in configs/recipes/ and ``vlp train --dry-run``: every recipe plans, and one plan's
arithmetic (steps, epochs, samples seen, warm-up, memory terms) equals values computed here by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from tests.conftest import REPO, run_main

RECIPES = sorted((REPO / "configs" / "recipes").glob("*.yaml"))
P_VIT_B32 = 151_277_313  # checked by hand below (test_vit_b32_parameters_by_hand)

# the published hyperparameters each recipe must carry, typed here from the sources its header cites
PUBLISHED = {
    "cc3m_vit_b32": dict(global_batch=1024, lr=1e-3, weight_decay=0.1, warmup=10_000, epochs=30, per_epoch=2_905_954),
    "cc12m_vit_b32": dict(global_batch=1280, lr=5e-4, weight_decay=0.2, warmup=10_000, epochs=32, per_epoch=10_968_539),
    "laion400m_vit_b32": dict(
        global_batch=32768, lr=5e-4, weight_decay=0.2, warmup=2000, epochs=32, per_epoch=407_332_084
    ),
    "datacomp_small_vit_b32": dict(global_batch=4096, lr=5e-4, weight_decay=0.2, warmup=500, seen=12_800_000),
    "datacomp_medium_vit_b32": dict(global_batch=4096, lr=5e-4, weight_decay=0.2, warmup=500, seen=128_000_000),
}


@pytest.fixture(autouse=True)
def _no_launcher(monkeypatch):
    for key in ("WORLD_SIZE", "RANK", "SLURM_NTASKS"):
        monkeypatch.delenv(key, raising=False)


def dry_run(tmp_path, config, *args, env=None, check=True):
    out = tmp_path / "plan.json"
    sets = ["--set", f"train.output_dir={tmp_path / 'run'}"]
    proc = run_main("train", "--config", config, *sets, *args, "--dry-run", out, env=env, check=False)
    if check:
        assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc, (json.loads(out.read_text()) if out.is_file() else None)


def term(plan, prefix):
    (found,) = [t for t in plan["memory"]["terms"] if t["name"].startswith(prefix)]
    return found["bytes"]


def test_recipes_exist():
    assert {p.stem for p in RECIPES} == set(PUBLISHED)


def test_vit_b32_parameters_by_hand():
    def block(w):  # attention in/out projections, two LayerNorms, the 4x MLP, with biases
        return (3 * w * w + 3 * w) + (w * w + w) + 4 * w + (4 * w * w + 4 * w) + (4 * w * w + w)

    vision = 768 * 3 * 32 * 32 + 768 + 50 * 768 + 2 * 768 + 12 * block(768) + 2 * 768 + 768 * 512
    text = 49408 * 512 + 77 * 512 + 12 * block(512) + 2 * 512 + 512 * 512
    assert vision + text + 1 == P_VIT_B32  # + the logit scale


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_plans(recipe, tmp_path):
    text = recipe.read_text()
    header = text.split("\nmodel:")[0]
    for needed in ("Aims at:", "Hardware:", "Run:", f"--config configs/recipes/{recipe.name}", "launch/", "# plan:"):
        assert needed in header, needed
    assert "%" in header.split("Aims at:")[1].split("Hardware:")[0]  # a published accuracy, with its source
    proc, plan = dry_run(tmp_path, recipe.relative_to(REPO))
    want = PUBLISHED[recipe.stem]
    r, s = plan["recipe"], plan["schedule"]
    assert plan["world"]["size"] == r["nodes"] * r["gpus_per_node"]
    assert plan["world"]["source"].startswith("the recipe")
    assert s["global_batch"] == r["global_batch"] == want["global_batch"]
    assert (s["lr"], s["weight_decay"], s["warmup_steps"]) == (want["lr"], want["weight_decay"], want["warmup"])
    assert (s["betas"], s["eps"], s["grad_clip"], s["precision"]) == ([0.9, 0.98], 1e-6, 0.0, "bf16")
    seen = want.get("seen") or want["epochs"] * want["per_epoch"]
    assert abs(s["samples_seen"] - seen) <= s["global_batch"] / 2  # rounded to whole steps
    assert abs(r["samples_seen"] - seen) <= 1
    assert plan["model"]["params"] == P_VIT_B32
    assert plan["eval"]["datasets"] == ["wds/imagenet1k"] and plan["cadence"]["evals"] >= 5
    assert plan["memory"]["fits"] and plan["memory"]["total_gib"] > 1
    # the data do not exist here: named as missing, not an error; the plan still comes
    kinds = {p["kind"] for p in plan["problems"]}
    assert kinds == {"missing"} and not plan["ready"], plan["problems"]
    assert any("${EVAL_ROOT}" in p["message"] for p in plan["problems"])
    assert "steps" in proc.stdout and "memory per device" in proc.stdout and "plan written to" in proc.stdout


def test_laion400m_plan_by_hand(tmp_path):
    _, plan = dry_run(tmp_path, "configs/recipes/laion400m_vit_b32.yaml")
    W, B, N, per_epoch = 32 * 4, 256, 32 * 4 * 256, 407_332_084
    steps = round(32 * per_epoch / N)
    s, c = plan["schedule"], plan["cadence"]
    assert (W, N, steps) == (plan["world"]["size"], s["global_batch"], 397_785) == (128, 32768, s["steps"])
    assert s["samples_seen"] == steps * N == 13_034_618_880
    assert s["epochs"] == pytest.approx(13_034_618_880 / per_epoch) == pytest.approx(31.99998, abs=1e-5)
    assert (s["warmup_samples"], s["warmup_fraction"]) == (2000 * N, pytest.approx(2000 / steps))
    assert c["checkpoints"] == c["evals"] == 397_785 // 12_431 + 1 == 32
    assert c["checkpoint_bytes"] == 4 * P_VIT_B32 * 3
    P = P_VIT_B32
    by_hand = {
        "weights (fp32)": 4 * P,
        "gradients (fp32)": 4 * P,
        "DDP gradient buckets": 4 * P,
        "AdamW state": 8 * P,
        "16-bit weight copies": 2 * P,
        # 12 layers x (20 + 4 x MLP ratio 4) bytes x tokens x batch x width
        "activations, image tower": 12 * 36 * 50 * B * 768,
        "activations, text tower": 12 * 36 * 77 * B * 512,
        "input images": B * 3 * 224 * 224 * (1 + 4 + 2),
        "loss logits": int(2.75 * 4 * B * (N + N)),
        "gathered features": 4 * 4 * N * 512,
    }
    for name, value in by_hand.items():
        assert term(plan, name) == value, name
    assert len(plan["memory"]["terms"]) == len(by_hand)
    assert plan["memory"]["total_bytes"] == sum(by_hand.values())
    assert plan["memory"]["reference"]["open_clip_clip_loss_bytes"] == int(4.5 * 4 * N * N)


def test_sharded_backends_by_hand(tmp_path):
    recipe = "configs/recipes/datacomp_small_vit_b32.yaml"
    P, W = P_VIT_B32, 8
    _, zero2 = dry_run(tmp_path, recipe, "--set", "train.backend=deepspeed", "--set", "train.deepspeed.zero_stage=2")
    assert zero2["world"]["backend"] == "deepspeed" and zero2["world"]["zero_stage"] == 2
    assert term(zero2, "weights (16-bit)") == 2 * P
    assert term(zero2, "gradients (16-bit)") == int(2 * P / W)
    assert term(zero2, "AdamW state + fp32 master") == int(12 * P / W)
    _, fsdp = dry_run(tmp_path, recipe, "--set", "train.backend=fsdp", "--set", "model.grad_checkpointing=true")
    vision_block, text_block = 7_087_872, 3_152_384  # block(768), block(512) of the hand count above
    root = P - 12 * vision_block - 12 * text_block
    assert term(fsdp, "weights (fp32 shards)") == int(4 * P / W)
    assert term(fsdp, "AdamW state (2 x fp32 shards)") == int(8 * P / W)
    assert term(fsdp, "gathered weights (FSDP") == 2 * (root + 2 * vision_block)
    # checkpointing: each layer keeps its fp32 input, one layer is recomputed in full
    assert term(fsdp, "activations, image tower") == (12 * 4 + 36) * 50 * 512 * 768


def test_world_size_from_the_environment_and_the_flag(tmp_path):
    recipe = "configs/recipes/datacomp_small_vit_b32.yaml"
    _, plan = dry_run(tmp_path, recipe, env={"WORLD_SIZE": "4"})
    assert plan["world"] == {"size": 4, "source": "WORLD_SIZE", "backend": "ddp", "zero_stage": None}
    # the epoch length keeps the samples seen; the smaller global batch is a warning
    assert (plan["schedule"]["steps"], plan["schedule"]["samples_seen"]) == (6250, 12_800_000)
    assert any(p["kind"] == "warning" and "4096" in p["message"] for p in plan["problems"])
    _, plan = dry_run(tmp_path, recipe, "--world-size", "16", "--set", "data.batch_size=256", env={"WORLD_SIZE": "4"})
    assert (plan["world"]["size"], plan["world"]["source"], plan["schedule"]["global_batch"]) == (
        16,
        "--world-size",
        4096,
    )


def test_dry_run_on_shards_that_exist(shapes_shards, tmp_path):
    pattern = shapes_shards["train"].replace("{000000..000007}", "{000000..000009}")  # 2 shards too many
    _, plan = dry_run(tmp_path, "configs/demo.yaml", "--set", f"data.train_shards={pattern}", "--world-size", "2")
    train = plan["data"]["train_shards"]
    assert (train["listed"], train["found"], train["missing"]) == (10, 8, 2)
    assert train["missing_first"][0].endswith("shapes-000008.tar")
    sets = ["--set", f"data.train_shards={shapes_shards['train']}", "--set", "train.epochs=2"]
    sets += [
        "--set",
        "data.batch_size=16",
        "--set",
        "data.workers=1",
        "--set",
        "eval.data=[]",
        "--set",
        "eval.tasks=[]",
    ]
    sets += ["--set", f"data.val_shards={shapes_shards['val']}"]
    _, plan = dry_run(tmp_path, "configs/demo.yaml", *sets, "--world-size", "2")
    s = plan["schedule"]
    assert (s["samples_per_epoch"], s["samples_per_epoch_source"]) == (256, "the shards' sizes.json")
    assert (s["steps"], s["epochs"]) == (2 * 256 // 32, 2.0)
    assert plan["ready"], plan["problems"]


def test_errors_exit_2_and_missing_data_exits_0(tmp_path):
    proc, plan = dry_run(
        tmp_path, "configs/demo.yaml", "--set", "train.backend=single", "--world-size", "2", check=False
    )
    assert proc.returncode == 2 and "error: train.backend=single" in proc.stdout
    assert plan is not None  # the plan is written all the same
    proc, _ = dry_run(tmp_path, "configs/demo.yaml", "--set", "data.workers=4", "--world-size", "4", check=False)
    assert proc.returncode == 2 and "cannot feed 4 rank(s)" in proc.stdout  # 12 shards, 16 readers
    proc = run_main("train", "--config", "configs/demo.yaml", "--world-size", "2", check=False)
    assert proc.returncode == 2 and "--world-size plans a run" in proc.stderr


def test_default_plan_path_no_weights_no_process_group(tmp_path):
    import torch.distributed as dist

    out = tmp_path / "run"
    sets = [
        "--set",
        f"train.output_dir={out}",
        "--set",
        "model.name=ViT-B-32",
        "--set",
        "model.pretrained=laion2b_s34b_b79k",
    ]
    proc = run_main("train", "--config", "configs/demo.yaml", *sets, "--dry-run", env={"HF_HUB_OFFLINE": "1"})
    assert f"plan written to {out / 'plan.json'}" in proc.stdout
    plan = json.loads((out / "plan.json").read_text())
    assert plan["model"]["params"] == P_VIT_B32  # counted on the meta device: no weights fetched
    assert not dist.is_initialized()
    assert not (out / "checkpoints").exists()


def test_only_rank_0_prints(tmp_path):
    proc, plan = dry_run(tmp_path, "configs/demo.yaml", env={"RANK": "1", "WORLD_SIZE": "2"})
    assert proc.stdout == "" and plan is None


def test_recipe_header_parser(tmp_path):
    from vlp.train.plan import recipe_header

    path = Path(tmp_path, "r.yaml")
    path.write_text(
        "# Recipe\n# plan: nodes=2 gpus_per_node=8 gpu=H100\n# plan: global_batch=4096\nmodel: {}\n# plan: x=1\n"
    )
    assert recipe_header(path) == {"nodes": 2, "gpus_per_node": 8, "gpu": "H100", "global_batch": 4096}


def test_recipe_variables_come_from_the_environment(shapes_shards, tmp_path, monkeypatch):
    from vlp.config import load_config

    recipe = REPO / "configs" / "recipes" / "cc3m_vit_b32.yaml"
    monkeypatch.setenv("CC3M_SHARDS", shapes_shards["train"])
    monkeypatch.delenv("EVAL_ROOT", raising=False)
    cfg = load_config(recipe)
    assert cfg.data.train_shards == [shapes_shards["train"]]
    assert cfg.eval.dataset_root == "${EVAL_ROOT}"  # unset: left as written, for the dry run to name
    plan = run_main("train", "--config", recipe, "--dry-run", tmp_path / "plan.json", check=False)
    assert re.search(r"data\.train_shards: (\d+) shard\(s\) from 1 pattern\(s\): \1 found", plan.stdout), plan.stdout
    assert "eval.dataset_root holds ${EVAL_ROOT}, which is not set" in plan.stdout
    # a real start stops on the unset variable in one line, before anything is built
    proc = run_main("train", "--config", recipe, "--set", f"train.output_dir={tmp_path / 'run'}", check=False)
    assert proc.returncode == 2
    assert "eval.dataset_root uses ${EVAL_ROOT}, which is not set in the environment" in proc.stderr
    assert not (tmp_path / "run").exists()
