"""Hard negatives and counting counterfactuals in training batches: the stream attaches them
(from the shards or generated online, seeded, exact on resume), the model encodes them inside its
forward, the objective's terms use them, and exact accumulation still holds (with minimal-pair ids
too, a pair split across micro-batches included)."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from conftest import REPO, png_bytes, write_tar

from tests.test_stream import _loader, _take
from vlp.config import LossConfig, load_config
from vlp.data.counting import count_of
from vlp.data.extra_captions import ExtraCaptionSpec
from vlp.losses import Objective
from vlp.models.extras import ExtraTexts
from vlp.models.registry import build_model
from vlp.models.tokenizer import get_tokenizer
from vlp.train.logging import read_metrics
from vlp.train.step import forward_backward

TOK = get_tokenizer("debug")
CAPTIONS = ["two red circles", "a blue square and a green star", "three large yellow triangles", "a purple cross"]


def _shards(tmp_path, with_field: bool) -> str:
    samples = []
    for i in range(32):
        caption = CAPTIONS[i % 4]
        meta = {"k": i}
        if with_field and i % 2 == 0:
            meta["hard_negatives"] = [{"text": f"shard negative {i}", "type": "replace_object"}]
        samples.append({"__key__": f"s{i:04d}", "png": png_bytes(color=(i * 7, 0, 0)), "txt": caption.encode(),
                        "json": json.dumps(meta).encode()})  # fmt: skip
    write_tar(tmp_path / "x-000000.tar", samples[:16])
    write_tar(tmp_path / "x-000001.tar", samples[16:])
    return str(tmp_path / "x-{000000..000001}.tar")


def _spec(**kw):
    base = dict(negatives_k=2, negatives_types=("replace_attribute", "replace_object", "swap_attributes"))
    return ExtraCaptionSpec(**{**base, **kw})


def _decode(tokens):
    import open_clip

    return [open_clip.decode(t).replace("<start_of_text>", "").split("<end_of_text>")[0].strip() for t in tokens]


def test_batches_carry_negatives_and_counterfactuals(tmp_path):
    pattern = _shards(tmp_path, with_field=True)
    loader = _loader(pattern, batch_size=8, extras=_spec(counterfactuals=True), shuffle_buffer=0)
    batch = next(iter(loader))
    assert batch["text_neg"].shape == (8, 2, 32) and batch["text_cf"].shape == (8, 32)
    for i, caption in enumerate(batch["caption"]):
        negs = _decode(batch["text_neg"][i])
        assert caption not in negs and all(negs)
        key = int(batch["__key__"][i][1:])
        if key % 2 == 0:  # the shard's own negative comes first, then an online one
            # (the BPE decoder spaces out digits: compare without spaces)
            assert negs[0].replace(" ", "") == f"shardnegative{key}" and negs[1] != negs[0]
        cf = _decode(batch["text_cf"][i : i + 1])[0]
        assert bool(batch["has_cf"][i]) == (count_of(caption) is not None)
        if batch["has_cf"][i]:
            assert cf != caption and count_of(cf) is not None and cf.split()[1:] == caption.split()[1:]
    assert loader.negative_sources["shard"] >= 1 and loader.negative_sources["online"] >= 1


@pytest.mark.parametrize("workers", [0, 2])
def test_extra_captions_are_reproducible_and_exact_on_resume(tmp_path, workers):
    pattern = _shards(tmp_path, with_field=False)
    kw = dict(batch_size=4, workers=workers, extras=_spec(counterfactuals=True), seed=5)
    full = _take(_loader(pattern, **kw), 8)
    first = _loader(pattern, **kw)
    head = _take(first, 3)
    tail = _take(_loader(pattern, state=first.state_dict(), **kw), 5)
    for a, b in zip(full, head + tail, strict=True):
        assert torch.equal(a["text_neg"], b["text_neg"]) and torch.equal(a["text_cf"], b["text_cf"])
        assert torch.equal(a["has_cf"], b["has_cf"])


def test_the_wrapper_encodes_extra_captions_like_the_model():
    torch.manual_seed(0)
    model = build_model("debug")[0].eval()
    wrapped = ExtraTexts(model)
    neg = TOK(["a red star", "two blue squares", "a green cross", "three circles"]).view(2, 2, 32)
    cf = TOK(["three red circles", "four blue squares"])
    out = wrapped(torch.randn(2, 3, 64, 64), TOK(["two red circles", "a blue square"]), neg, cf,
                  torch.tensor([True, False]))  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(out["neg_text_features"][1, 0], model.encode_text(neg[1, :1])[0], atol=1e-6)
        assert torch.allclose(out["cf_text_features"], model.encode_text(cf), atol=1e-6)
    assert out["has_cf"].tolist() == [True, False]


def _micro(k, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(b, 3, 64, 64, generator=g, dtype=torch.float64),
            "text": torch.randint(1, 49000, (b, 32), generator=g),
            "text_neg": torch.randint(1, 49000, (b, 2, 32), generator=g),
            "text_cf": torch.randint(1, 49000, (b, 32), generator=g),
            "has_cf": torch.rand(b, generator=g) > 0.4,
            # minimal pairs: (0, 1) in the first micro-batch, one straddling both, -1 for none
            "pair_id": torch.tensor([1, 1, 2, -1] if i == 0 else [2, 3, 3, 4]),
            "caption": [""] * b,
        }
        for i in range(k)
    ]


def test_accumulation_stays_exact_with_negatives_counterfactuals_and_pairs():
    torch.manual_seed(0)
    model = ExtraTexts(build_model("debug")[0].double().train())
    cfg = LossConfig()
    cfg.negatives.image_grounded_weight = 0.5
    cfg.pair_weight = 0.7
    micro = _micro(2, 4)
    whole = [{k: torch.cat([m[k] for m in micro]) if k != "caption" else [""] * 8 for k in micro[0]}]
    grads = []
    for batches in (micro, whole):
        model.zero_grad(set_to_none=True)
        loss, terms, _ = forward_backward(model, Objective(cfg), batches, device=torch.device("cpu"),
                                          autocast=contextlib.nullcontext,
                                          scaler=torch.amp.GradScaler("cpu", enabled=False))  # fmt: skip
        grads.append((loss, terms, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (la, ta, ga), (lb, tb, gb) = grads
    assert set(ta) == {"contrastive", "image_grounded", "counting", "pair"}
    assert la.item() == pytest.approx(lb.item(), abs=1e-10)
    for n in gb:
        assert torch.allclose(ga[n], gb[n], atol=1e-9, rtol=0), n


def test_trainer_with_negatives_grounded_contrasts_and_counting(shapes_shards, tmp_path):
    from vlp.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        [
            f"data.train_shards=['{shapes_shards['train']}']", "data.val_shards=[]", "eval.data=[]", "eval.tasks=[]",
            "data.workers=0", "data.batch_size=8", "data.negatives.k=2", "data.counterfactuals=true",
            "loss.negatives.image_grounded_weight=1.0", "loss.negatives.text_grounded_weight=0.5",
            f"train.output_dir={tmp_path}", "train.steps=3", "train.log_every=1", "train.checkpoint_every=0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    assert isinstance(trainer.train_module, ExtraTexts) and trainer.teacher is not None  # teacher for the TGC
    trainer.train()
    last = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r][-1]
    for term in ("contrastive", "image_grounded", "text_grounded", "counting"):
        assert 0 < last[f"loss/{term}"] < 20, (term, last)
    assert last.get("data/negatives/online", 0) > 0 and "distill/alpha" not in last
