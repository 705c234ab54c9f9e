"""Contrastive and sigmoid losses: every impl at world sizes 1, 2 and 4 equals an independent
single-process full-batch reference (fp64, 1e-9), parity with open_clip, tiled numerics."""

from __future__ import annotations

import functools

import open_clip
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import SigLipLoss

from tests.distributed import run_distributed
from vlp.losses import clip_loss, siglip_loss
from vlp.losses.regularizers import alignment_loss, uniformity_loss

N, D, K = 16, 8, 2

# (name, kwargs) of every configuration checked against the reference
CLIP_CASES = [
    (f"{impl}-k{k}-{extra}", dict(impl=impl, k=k, **opts))
    for impl in ("gather", "tiled")
    for k, extra, opts in [
        (0, "plain", {}),
        (K, "negclip", {}),
        (K, "own", {"own_negatives": True}),
        (0, "dcl", {"dcl": True}),
        (K, "smooth", {"label_smoothing": 0.1}),
    ]
]
REG_CASES = [("align", dict(reg="align", k=0)), ("uniform", dict(reg="uniform", k=0))]
SIGLIP_CASES = [(f"siglip-{impl}-k{k}", dict(impl=impl, k=k)) for impl in ("gather", "ring") for k in (0, K)]


def _features(k=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    img = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    txt = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=-1)
    neg = F.normalize(torch.randn(N, K, D, generator=g, dtype=torch.float64), dim=-1)
    return img, txt, neg if k else None


def _reference_clip(img, txt, scale, neg=None, own_negatives=False, dcl=False, label_smoothing=0.0):
    """Dense, hand-written InfoNCE on one process."""
    labels = torch.arange(img.shape[0])
    i2t = scale * img @ txt.T
    if neg is not None:
        extra = torch.einsum("bd,bkd->bk", img, neg) if own_negatives else img @ neg.reshape(-1, D).T
        i2t = torch.cat([i2t, scale * extra], dim=1)
    t2i = scale * txt @ img.T
    if dcl:
        eye = torch.zeros_like(i2t, dtype=torch.bool)
        eye[labels, labels] = True

        def dcl_ce(logits, mask):
            return (torch.logsumexp(logits.masked_fill(mask, float("-inf")), 1) - logits[labels, labels]).mean()

        return (dcl_ce(i2t, eye) + dcl_ce(t2i, eye[:, : t2i.shape[1]])) / 2
    ce = lambda x: F.cross_entropy(x, labels, label_smoothing=label_smoothing)  # noqa: E731
    return (ce(i2t) + ce(t2i)) / 2


def _reference(case: dict, img, txt, scale, bias, neg):
    if case.get("reg") == "align":
        return (img - txt).pow(2).sum(-1).mean()
    if case.get("reg") == "uniform":
        sq = torch.cdist(img, img).pow(2)
        off = ~torch.eye(img.shape[0], dtype=torch.bool)
        return torch.log(torch.exp(-2.0 * sq[off]).mean())
    opts = {k: v for k, v in case.items() if k not in ("impl", "k", "group_size", "world")}
    if "siglip" in case:
        loss = SigLipLoss()(img, txt, scale, bias)
        if neg is not None:  # hard negatives: extra columns with label -1, normalised by the batch
            loss = loss - F.logsigmoid(-(scale * img @ neg.reshape(-1, D).T + bias)).sum() / img.shape[0]
        return loss
    g = case.get("group_size")
    if not g:
        return _reference_clip(img, txt, scale, neg, **opts)
    b = img.shape[0] // (case["world"] // g) if "world" in case else img.shape[0]
    parts = [slice(i, i + b) for i in range(0, img.shape[0], b)]
    return torch.stack([_reference_clip(img[p], txt[p], scale, None, **opts) for p in parts]).mean()


def _leaves(k):
    img, txt, neg = _features(k)
    leaves = {
        "img": img,
        "txt": txt,
        "scale": torch.tensor(20.0, dtype=torch.float64),
        "bias": torch.tensor(-3.0, dtype=torch.float64),
    }
    if neg is not None:
        leaves["neg"] = neg
    return {n: t.clone().requires_grad_(True) for n, t in leaves.items()}


def _ours(case: dict, leaves: dict, sl=slice(None)):
    if case.get("reg") == "align":
        return alignment_loss(leaves["img"][sl], leaves["txt"][sl])
    if case.get("reg") == "uniform":
        return uniformity_loss(leaves["img"][sl], t=2.0)
    neg = leaves["neg"][sl] if "neg" in leaves else None
    if "siglip" in case:
        return siglip_loss(
            leaves["img"][sl],
            leaves["txt"][sl],
            leaves["scale"],
            leaves["bias"],
            impl=case["impl"],
            neg_text_features=neg,
        )
    kw = {k: v for k, v in case.items() if k not in ("k", "world")}
    return clip_loss(leaves["img"][sl], leaves["txt"][sl], leaves["scale"], neg_text_features=neg, tile_size=3, **kw)


def _all_cases(world):
    cases = [dict(c) for _, c in CLIP_CASES + REG_CASES] + [dict(c, siglip=True) for _, c in SIGLIP_CASES]
    if world > 1:
        cases.append(dict(impl="grouped", k=0, group_size=world // 2 if world > 2 else 1, world=world))
    return cases


def _rank_run(rank, world):
    out = []
    for case in _all_cases(world):
        leaves = _leaves(case["k"])
        b = N // world
        loss = _ours(case, leaves, slice(rank * b, (rank + 1) * b))
        loss.backward()
        out.append({"loss": loss.detach(), **{n: t.grad.clone() for n, t in leaves.items() if t.grad is not None}})
    return out


def _check(case, results, world):
    leaves = _leaves(case["k"])
    ref = _reference(case, leaves["img"], leaves["txt"], leaves["scale"], leaves["bias"], leaves.get("neg"))
    ref.backward()
    for r in results:
        assert torch.allclose(r["loss"], ref.detach(), atol=1e-9, rtol=0), (case, r["loss"], ref)
    for name, leaf in leaves.items():
        if leaf.grad is None:
            continue
        if name in ("scale", "bias"):  # a parameter: DDP averages the ranks' gradients
            got = torch.stack([r[name] for r in results]).mean()
        else:  # per-sample features: each rank's gradient of its slice, divided by W (the DDP mean)
            b = N // world
            got = torch.cat([r[name][i * b : (i + 1) * b] for i, r in enumerate(results)]) / world
        assert torch.allclose(got, leaf.grad, atol=1e-9, rtol=0), (case, name)


@pytest.mark.parametrize(
    "case",
    [c for _, c in CLIP_CASES + REG_CASES] + [dict(c, siglip=True) for _, c in SIGLIP_CASES],
    ids=[n for n, _ in CLIP_CASES + REG_CASES + SIGLIP_CASES],
)
def test_single_process_equals_reference(case):
    leaves = _leaves(case["k"])
    loss = _ours(case, leaves)
    loss.backward()
    _check(case, [{"loss": loss.detach(), **{n: t.grad for n, t in leaves.items() if t.grad is not None}}], 1)


@pytest.mark.parametrize("world", [2, 4])
def test_distributed_equals_reference(world):
    per_rank = [r["cases"] for r in _distributed(world)]
    for i, case in enumerate(_all_cases(world)):
        _check(case, [r[i] for r in per_rank], world)


def _open_clip_rank(rank, world):
    img, txt, _ = _features()
    b = N // world
    sl = slice(rank * b, (rank + 1) * b)
    scale, bias = torch.tensor(20.0, dtype=torch.float64), torch.tensor(-3.0, dtype=torch.float64)
    theirs_clip = open_clip.ClipLoss(local_loss=True, gather_with_grad=True, rank=rank, world_size=world)(
        img[sl], txt[sl], scale
    )
    theirs_sig = SigLipLoss(rank=rank, world_size=world)(img[sl], txt[sl], scale, bias)
    return {
        "clip_theirs": theirs_clip,
        "sig_theirs": theirs_sig,
        "gather": clip_loss(img[sl], txt[sl], scale),
        "tiled": clip_loss(img[sl], txt[sl], scale, impl="tiled"),
        "sig_gather": siglip_loss(img[sl], txt[sl], scale, bias),
        "sig_ring": siglip_loss(img[sl], txt[sl], scale, bias, impl="ring"),
    }


def _both_rank(rank, world):
    return {"cases": _rank_run(rank, world), "open_clip": _open_clip_rank(rank, world)}


@functools.cache
def _distributed(world):
    """Every case and the open_clip comparison in one process group per world size (spawning is slow)."""
    return run_distributed(_both_rank, world)


@pytest.mark.parametrize("world", [1, 2, 4])
def test_parity_with_open_clip(world):
    res = [_open_clip_rank(0, 1)] if world == 1 else [r["open_clip"] for r in _distributed(world)]
    # open_clip returns each rank's own rows' loss; ours returns their mean on every rank
    clip_mean = torch.stack([r["clip_theirs"] for r in res]).mean()
    sig_mean = torch.stack([r["sig_theirs"] for r in res]).mean()
    for r in res:
        assert torch.allclose(r["gather"], clip_mean, atol=1e-12) and torch.allclose(r["tiled"], clip_mean, atol=1e-12)
        assert torch.allclose(r["sig_gather"], sig_mean, atol=1e-12)
        assert torch.allclose(r["sig_ring"], sig_mean, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_is_finite_and_exact_at_logit_scale_100(dtype):
    g = torch.Generator().manual_seed(3)
    img = F.normalize(torch.randn(300, 64, generator=g), dim=-1).to(dtype).requires_grad_(True)
    txt = F.normalize(torch.randn(300, 64, generator=g), dim=-1).to(dtype).requires_grad_(True)
    tiled = clip_loss(img, txt, torch.tensor(100.0), impl="tiled", tile_size=64)
    tiled.backward()
    g_tiled = img.grad.clone()
    img.grad = None
    # reference: the dense loss on the same (rounded) inputs in fp64
    ref = _reference_clip(img.double(), txt.double(), 100.0)
    ref.backward()
    assert torch.isfinite(tiled) and torch.isfinite(g_tiled).all()
    assert abs(tiled.item() - ref.item()) < 1e-4 * max(1.0, ref.item())
    assert torch.allclose(g_tiled.double(), img.grad.double(), atol=5e-3 if dtype == torch.bfloat16 else 1e-5)


def test_clear_errors():
    img, txt, _ = _features()
    with pytest.raises(ValueError, match="unknown contrastive impl 'tiles'.*gather, tiled, grouped"):
        clip_loss(img, txt, 1.0, impl="tiles")
    with pytest.raises(ValueError, match="neg_text_features must be B x K x D"):
        clip_loss(img, txt, 1.0, neg_text_features=torch.zeros(3, 2, D))
    with pytest.raises(ValueError, match="dcl and label_smoothing"):
        clip_loss(img, txt, 1.0, dcl=True, label_smoothing=0.1)
    with pytest.raises(ValueError, match="unknown siglip impl"):
        siglip_loss(img, txt, 1.0, 0.0, impl="x")
