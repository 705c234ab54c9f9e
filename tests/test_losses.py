"""clip_loss: parity with open_clip, and exact loss + gradients across gloo ranks."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from vlp.losses import clip_loss


def _features(n=16, d=8, k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(n, k, d, generator=g, dtype=torch.float64), dim=-1) if k else None
    return img, txt, neg


def _reference(img, txt, scale, neg=None):
    """Hand-written single-process InfoNCE (NegCLIP columns in the image->text direction)."""
    labels = torch.arange(img.shape[0])
    cols = txt if neg is None else torch.cat([txt, neg.reshape(-1, txt.shape[1])])
    i2t = F.cross_entropy(scale * img @ cols.T, labels)
    t2i = F.cross_entropy(scale * txt @ img.T, labels)
    return (i2t + t2i) / 2


def test_matches_open_clip_single_process():
    img, txt, _ = _features()
    scale = torch.tensor(14.3, dtype=torch.float64)
    ours = clip_loss(img, txt, scale)
    theirs = open_clip.ClipLoss()(img, txt, scale)
    assert torch.allclose(ours, theirs, atol=1e-12)


def test_hard_negatives_match_reference():
    img, txt, neg = _features(k=3)
    assert torch.allclose(clip_loss(img, txt, 10.0, neg_text_features=neg), _reference(img, txt, 10.0, neg), atol=1e-12)


def test_unknown_impl_is_a_clear_error():
    img, txt, _ = _features()
    with pytest.raises(ValueError, match="unknown contrastive impl 'tiles'.*gather"):
        clip_loss(img, txt, 1.0, impl="tiles")


def _rank_grads(rank, world):
    return {k: _rank_grads_k(rank, world, k) for k in (0, 2)}


def _rank_grads_k(rank, world, k):
    img, txt, neg = _features(n=16, k=k)
    b = 16 // world
    sl = slice(rank * b, (rank + 1) * b)
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    mine = [t[sl].clone().requires_grad_(True) for t in (img, txt)]
    neg_local = neg[sl].clone().requires_grad_(True) if k else None
    loss = clip_loss(mine[0], mine[1], scale, neg_text_features=neg_local)
    loss.backward()
    # DDP's parameter-gradient rule: the mean over ranks; features are per-rank slices
    grads = [mine[0].grad, mine[1].grad, scale.grad.reshape(1)] + ([neg_local.grad] if k else [])
    theirs = (
        open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
            img[sl], txt[sl], torch.tensor(20.0, dtype=torch.float64)
        )
        if not k
        else torch.tensor(float("nan"))
    )
    return {"loss": loss.detach(), "grads": grads, "open_clip": theirs}


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_single_process_full_batch(world):
    per_k = run_distributed(_rank_grads, world)  # one process group for both cases (spawning is slow)
    for k in (0, 2):
        _check_against_full_batch([r[k] for r in per_k], world, k)


def _check_against_full_batch(results, world, k):
    img, txt, neg = _features(n=16, k=k)
    leaves = [t.clone().requires_grad_(True) for t in (img, txt)]
    scale = torch.tensor(20.0, dtype=torch.float64, requires_grad=True)
    neg_leaf = neg.clone().requires_grad_(True) if k else None
    ref = _reference(leaves[0], leaves[1], scale, neg_leaf)
    ref.backward()
    for r in results:  # every rank returns the global loss
        assert torch.allclose(r["loss"], ref.detach(), atol=1e-12)
    # per-sample gradients: each rank's slice, divided by W because DDP averages the ranks' grads
    for idx, full in enumerate([leaves[0].grad, leaves[1].grad] + ([neg_leaf.grad] if k else [])):
        got = torch.cat([r["grads"][idx if idx < 2 else 3] for r in results]) / world
        assert torch.allclose(got, full, atol=1e-12), idx
    scale_grad = torch.stack([r["grads"][2] for r in results]).mean()
    assert torch.allclose(scale_grad, scale.grad, atol=1e-12)
    if not k:  # open_clip in its exact mode gives the same per-rank loss value on average
        assert torch.allclose(torch.stack([r["open_clip"] for r in results]).mean(), ref.detach(), atol=1e-12)
