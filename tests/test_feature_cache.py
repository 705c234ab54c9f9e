"""LiT with cached trunk features: batches without repeated captions, heads equal to the full model,
the trainer's cached path (validation, early stopping, resume) on tiny random towers."""

from __future__ import annotations

import shutil
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO, tiny_tower_sets

from vlp.config import load_config
from vlp.data.stream import caption_norm
from vlp.models.registry import build_model
from vlp.train.feature_cache import CachedBatches, CachedHeads, FeatureCache, TrunkEncoder
from vlp.train.logging import read_metrics


def _cache(n=40, repeated=12, variants=3, seed=0) -> FeatureCache:
    """``n`` samples with ``variants`` captions each; the first ``repeated`` share one title."""
    gen = torch.Generator().manual_seed(seed)
    captions, counts = [], []
    for i in range(n):
        title = "gramastar" if i < repeated else f"thing {i}"
        own = [title, f"a drawing of {title}", f"{title}, shapes"][:variants]
        captions += own
        counts.append(len(own))
    first = torch.zeros(n + 1, dtype=torch.long)
    first[1:] = torch.cumsum(torch.tensor(counts), 0)
    return FeatureCache(
        image=torch.randn(n, 6, generator=gen),
        text=torch.randn(len(captions), 5, generator=gen),
        first_text=first,
        captions=captions,
        keys=[f"{i:04d}" for i in range(n)],
    )


def _owners(cache, batch) -> list[int]:
    """Which sample each row of a batch came from (image features identify the sample)."""
    return [int((cache.image == row).all(1).nonzero()) for row in batch["image"]]


def _epoch_batches(batches: CachedBatches, count: int) -> list[dict]:
    it = iter(batches)
    return [next(it) for _ in range(count)]


def test_unique_batches_never_repeat_a_title_and_use_every_other_sample():
    cache = _cache()
    loader = CachedBatches(cache, 8, seed=3, unique=True)
    per_epoch = len(loader._epoch(0))
    assert per_epoch == 4  # 28 other titles and one "gramastar" per batch: 4 full batches of 8
    used = []
    for batch in _epoch_batches(loader, per_epoch):
        owners = _owners(cache, batch)
        titles = [caption_norm(cache.captions[int(cache.first_text[i])]) for i in owners]
        assert len(set(titles)) == len(titles)  # one "gramastar" per batch at most
        for i, caption in zip(owners, batch["caption"]):  # each caption is one of its sample's variants
            assert caption in cache.captions[cache.first_text[i] : cache.first_text[i + 1]]
        used += owners
    assert len(used) == len(set(used)) == 32 and set(range(12, 40)) <= set(used)
    assert loader._left_out == (1, 7)  # 8 "gramastar" unused: 1 alone in a 5th batch, 7 more waiting
    next(iter(loader))  # starting the next epoch books the left-out repeats
    assert loader.deferred_total == 7 and loader.epoch == 1


def test_without_unique_every_sample_is_used_and_repeats_may_meet():
    cache = _cache()
    loader = CachedBatches(cache, 8, seed=3, unique=False)
    owners = [i for b in _epoch_batches(loader, 5) for i in _owners(cache, b)]
    assert sorted(owners) == list(range(40))


def test_batches_are_reproducible_resumable_and_split_over_ranks():
    cache = _cache(n=64, repeated=10)
    ref = _epoch_batches(CachedBatches(cache, 8, seed=1), 9)  # crosses into epoch 1
    again = _epoch_batches(CachedBatches(cache, 8, seed=1), 9)
    assert all(torch.equal(a["text"], b["text"]) for a, b in zip(ref, again))
    other = _epoch_batches(CachedBatches(cache, 8, seed=2), 9)
    assert not all(torch.equal(a["text"], b["text"]) for a, b in zip(ref, other))
    first = CachedBatches(cache, 8, seed=1)
    _epoch_batches(first, 5)
    resumed = _epoch_batches(CachedBatches(cache, 8, seed=1, state=first.state_dict()), 4)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(ref[5:], resumed))
    # two ranks with 4 each take the halves of the one-process batch of 8
    ranks = [_epoch_batches(CachedBatches(cache, 4, rank=r, world=2, seed=1), 9) for r in (0, 1)]
    for k in range(9):
        assert torch.equal(torch.cat([ranks[0][k]["text"], ranks[1][k]["text"]]), ref[k]["text"])


def test_too_few_samples_for_a_global_batch_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch of 32 x 2 ranks"):
        CachedBatches(_cache(n=40), 32, world=2)


def test_cached_heads_compute_the_full_models_features(tiny_hf_text):
    mcfg = load_config(None, tiny_tower_sets(tiny_hf_text)).model
    model, _, _ = build_model(mcfg)
    model.eval()
    from vlp.models.tokenizer import get_tokenizer

    tokens = get_tokenizer(mcfg)(["a red apple", "two big black dogs with a cat", ""])
    pixels = torch.randn(3, 3, 64, 64)
    trunk, heads = TrunkEncoder(model), CachedHeads(model)
    with torch.no_grad():
        out = heads(trunk.encode_image(pixels), trunk.encode_text(tokens))
        assert torch.allclose(out["image_features"], model.encode_image(pixels), atol=1e-5)
        assert torch.allclose(out["text_features"], model.encode_text(tokens), atol=1e-5)
    assert torch.allclose(out["logit_scale"], model.logit_scale.exp())
    assert {id(p) for p in heads.parameters()} <= {id(p) for p in model.parameters() if p.requires_grad}
    assert F.normalize(out["image_features"], dim=-1).shape == (3, 32)


def _lit_config(shards, hf, out, *extra):
    return load_config(
        REPO / "configs" / "demo.yaml",
        tiny_tower_sets(hf)
        + [
            f"data.train_shards=['{shards['train']}']",
            f"data.val_shards=['{shards['val']}']",
            "eval.tasks=[zeroshot_retrieval]",
            f"eval.data=['{shards['val']}']",
            "data.batch_size=16",
            "data.unique_captions=true",
            f"train.output_dir={out}",
            "train.steps=8",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.checkpoint_every=4",
            "train.eval_every=0",
            "train.lr=0.01",
            *extra,
        ],
    )


def _losses(out) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def test_lit_trains_on_cached_features_validates_and_resumes_exactly(shapes_shards, tiny_hf_text, tmp_path, capsys):
    from vlp.train.trainer import Trainer

    full, cut = tmp_path / "full", tmp_path / "cut"
    short = "model.text.context_length=10"  # some shapes captions are longer: their count is checked below
    summary = Trainer(_lit_config(shapes_shards, tiny_hf_text, full, "train.val_every=2", short)).train()
    printed = capsys.readouterr().out
    assert "encoding 256 train images" in printed and "encoding 64 val images" in printed
    assert len(list((full / "feature_cache").glob("train-*.pt"))) == 1
    records = read_metrics(full / "metrics.jsonl")
    scores = {r["step"]: r["val/score"] for r in records if "val/score" in r}
    assert sorted(scores) == [2, 4, 6, 8]
    assert summary["best_step"] == max(scores, key=lambda s: (scores[s], -s))
    assert summary["eval"]["zeroshot_retrieval/num_images"] == 64
    # captions longer than the text tower's 10 tokens, counted once when the cache was encoded
    from transformers import AutoTokenizer

    (cache_file,) = (full / "feature_cache").glob("train-*.pt")
    captions = torch.load(cache_file, weights_only=True)["captions"]
    hf = AutoTokenizer.from_pretrained(tiny_hf_text)
    long = sum(len(hf(c)["input_ids"]) > 10 for c in captions)
    assert 0 < long < len(captions) and summary["truncated_captions"] == long
    # killed after the step-4 checkpoint: the resumed run reads the cache and continues exactly
    shutil.copytree(full, cut)
    for late in (cut / "checkpoints").glob("step_0000000[5-8].pt"):
        late.unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000004.pt")
    lines = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("".join(line + "\n" for line in lines if '"step": 5' not in line))
    Trainer(_lit_config(shapes_shards, tiny_hf_text, cut, "train.val_every=2", short, "train.resume=latest")).train()
    printed = capsys.readouterr().out
    assert "features from the cache" in printed and "encoding 256" not in printed
    a, b = _losses(full), _losses(cut)
    for step in (5, 6, 7, 8):
        assert b[step] == pytest.approx(a[step], abs=1e-6), (step, a, b)


def test_early_stopping_ends_the_run_with_the_best_weights(shapes_shards, tiny_hf_text, tmp_path):
    from vlp.train.trainer import Trainer

    # a learning rate this large makes validation get worse after the first check
    cfg = _lit_config(
        shapes_shards, tiny_hf_text, tmp_path, "train.val_every=1", "train.early_stopping_patience=2",
        "train.steps=40", "train.lr=5.0", "train.warmup_steps=0", "train.grad_clip=0",
    )  # fmt: skip
    summary = Trainer(cfg).train()
    scores = {r["step"]: r["val/score"] for r in read_metrics(tmp_path / "metrics.jsonl") if "val/score" in r}
    assert summary["step"] < 40 and summary["step"] == max(scores)  # stopped early
    best = max(scores, key=lambda s: (scores[s], -s))
    assert summary["best_step"] == best and summary["step"] - best == 2  # two checks without improvement
    state = torch.load(summary["checkpoint"], weights_only=True)
    assert state["validation"]["best_step"] == best


@pytest.mark.slow
def test_two_processes_train_the_cached_heads_like_one_with_the_global_batch(shapes_shards, tiny_hf_text, tmp_path):
    """torchrun, 2 gloo ranks x 8: each rank encodes half the cache, all gather it, and the loss of
    every step equals one process with batch 16 (the same global batches, split by rank)."""
    import os
    import subprocess

    from tests.distributed import torchrun_cmd

    def sets(out, batch):
        cfg = tiny_tower_sets(tiny_hf_text) + [
            f"data.train_shards=['{shapes_shards['train']}']",
            "data.val_shards=[]",
            "eval.data=[]",
            "eval.tasks=[]",
            f"data.batch_size={batch}",
            "data.unique_captions=true",
            f"train.output_dir={out}",
            "train.steps=4",
            "train.log_every=1",
            "train.checkpoint_every=0",
            "train.lr=0.01",
        ]
        return ["--config", "configs/demo.yaml", *[a for s in cfg for a in ("--set", s)]]

    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    one, two = tmp_path / "one", tmp_path / "two"
    subprocess.run([sys.executable, "-m", "vlp.train", *sets(one, 16)], cwd=REPO, env=env, check=True,
                   capture_output=True, timeout=300)  # fmt: skip
    proc = subprocess.run(torchrun_cmd("vlp.train", sets(two, 8)), cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert all(len(list((out / "feature_cache").glob("train-*.pt"))) == 1 for out in (one, two))
    a, b = _losses(one), _losses(two)
    assert sorted(b) == [1, 2, 3, 4]
    for step in a:
        assert b[step] == pytest.approx(a[step], rel=1e-5, abs=1e-6), (step, a, b)


def test_a_damaged_cache_file_is_encoded_again(shapes_shards, tiny_hf_text, tmp_path, caplog, capsys):
    from vlp.train.trainer import Trainer

    trainer = Trainer(_lit_config(shapes_shards, tiny_hf_text, tmp_path))
    first = trainer.build_cache([shapes_shards["val"]], desc="val")
    (path,) = (tmp_path / "feature_cache").glob("val-*.pt")
    path.write_bytes(path.read_bytes()[:1000])  # a run killed mid-write by something other than vlp
    again = trainer.build_cache([shapes_shards["val"]], desc="val")
    assert "unreadable" in caplog.text and capsys.readouterr().out.count("encoding 64 val images") == 2
    assert torch.equal(first.image, again.image) and first.captions == again.captions
    assert trainer.build_cache([shapes_shards["val"]], desc="val").keys == first.keys  # rewritten whole
