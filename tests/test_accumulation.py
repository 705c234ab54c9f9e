"""Exact contrastive accumulation: k micro-batches give the gradient of one k*B batch."""

from __future__ import annotations

import contextlib

import open_clip
import pytest
import torch

from vlp.config import LossConfig
from vlp.losses import Objective
from vlp.models.registry import list_models
from vlp.train.step import forward_backward

SCALER = torch.amp.GradScaler("cpu", enabled=False)


def _model(patch_dropout=0.0):
    list_models()  # registers vlp's architectures with open_clip
    torch.manual_seed(0)
    model = open_clip.create_model("debug", force_patch_dropout=patch_dropout or None, output_dict=True)
    return model.double().train()


def _batches(k, b, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        {
            "image": torch.randn(b, 3, 64, 64, generator=g, dtype=torch.float64),
            "text": torch.randint(1, 49000, (b, 32), generator=g),
            "caption": [""] * b,
        }
        for _ in range(k)
    ]


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, micro):
    model.zero_grad(set_to_none=True)
    loss, _, _ = forward_backward(
        model,
        Objective(LossConfig()),
        micro,
        device=torch.device("cpu"),
        autocast=contextlib.nullcontext,
        scaler=SCALER,
    )
    return loss, _grads(model)


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_full_batch(k):
    model = _model()
    micro = _batches(k, 4)
    full = [
        {
            key: torch.cat([m[key] for m in micro]) if key != "caption" else sum((m[key] for m in micro), [])
            for key in micro[0]
        }
    ]
    loss_full, g_full = _run(model, full)
    loss_acc, g_acc = _run(model, micro)
    assert torch.allclose(loss_acc, loss_full, atol=1e-12)
    assert g_full.keys() == g_acc.keys() and "logit_scale" in g_acc
    for n in g_full:
        assert torch.allclose(g_acc[n], g_full[n], atol=1e-9, rtol=0), n


def test_patch_dropout_is_replayed_exactly():
    """With patch dropout the second forward must see the same masks as the cached one."""
    model = _model(patch_dropout=0.5)
    micro = _batches(3, 4)
    torch.manual_seed(5)
    _, g_acc = _run(model, micro)
    # reference: the same per-micro-batch RNG streams, one autograd graph over all micro-batches
    torch.manual_seed(5)
    model.zero_grad(set_to_none=True)
    outs = [model(m["image"], m["text"]) for m in micro]
    cat = {k: torch.cat([o[k] for o in outs]) for k in ("image_features", "text_features")}
    loss, _ = Objective(LossConfig())({**cat, "logit_scale": outs[0]["logit_scale"]})
    loss.backward()
    for n, g in _grads(model).items():
        assert torch.allclose(g_acc[n], g, atol=1e-9, rtol=0), n
