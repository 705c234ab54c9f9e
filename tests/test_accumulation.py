"""Exact contrastive accumulation: k micro-batches give the gradient of one k*B batch, in one
process and on 2 gloo processes with DDP; naive per-micro-batch accumulation does not."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.distributed as dist
from open_clip.transformer import PatchDropout

from tests.distributed import run_distributed
from vlp.config import ContrastiveConfig, LossConfig
from vlp.distributed import DistEnv
from vlp.losses import Objective, clip_loss
from vlp.losses.regularizers import alignment_loss, uniformity_loss
from vlp.models.registry import build_model
from vlp.train.plain_backend import wrap_model
from vlp.train.step import forward_backward

SCALER = torch.amp.GradScaler("cpu", enabled=False)
CPU = torch.device("cpu")


def _model(patch_dropout=0.0, attn_dropout=0.0):
    """The debug CLIP in fp64, training mode; the same weights on every call (and every rank)."""
    torch.manual_seed(0)
    model, _, _ = build_model("debug")
    if patch_dropout:
        model.visual.patch_dropout = PatchDropout(patch_dropout)
    for module in model.modules():
        if isinstance(module, torch.nn.MultiheadAttention):
            module.dropout = attn_dropout  # attention-probability dropout, used in training mode
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


def _cat(micro):
    """One batch holding the micro-batches' samples in order."""
    return {
        key: torch.cat([m[key] for m in micro]) if key != "caption" else sum((m[key] for m in micro), [])
        for key in micro[0]
    }


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, micro, loss_cfg=None):
    model.zero_grad(set_to_none=True)
    loss, _, _ = forward_backward(
        model,
        Objective(loss_cfg or LossConfig()),
        micro,
        device=CPU,
        autocast=contextlib.nullcontext,
        scaler=SCALER,
    )
    return loss, _grads(model)


def _assert_grads_equal(got, want, atol=1e-9):
    assert got.keys() == want.keys() and "logit_scale" in got
    for n in want:
        assert torch.allclose(got[n], want[n], atol=atol, rtol=0), (n, (got[n] - want[n]).abs().max())


def _flat(grads):
    return torch.cat([g.flatten() for _, g in sorted(grads.items())])


@pytest.mark.parametrize("k", [2, 4])
def test_accumulated_gradient_equals_full_batch(k):
    model = _model()
    micro = _batches(k, 4)
    loss_full, g_full = _run(model, [_cat(micro)])
    loss_acc, g_acc = _run(model, micro)
    assert torch.allclose(loss_acc, loss_full, atol=1e-12)
    _assert_grads_equal(g_acc, g_full)


def test_siglip_accumulated_gradient_equals_full_batch():
    """The sigmoid loss and the shared logit bias (its gradient enters once, on the last pass)."""
    torch.manual_seed(0)
    model = build_model("debug-siglip")[0].double().train()
    micro = _batches(3, 3)
    cfg = LossConfig(contrastive=ContrastiveConfig(type="siglip"))
    loss_full, g_full = _run(model, [_cat(micro)], cfg)
    loss_acc, g_acc = _run(model, micro, cfg)
    assert torch.allclose(loss_acc, loss_full, atol=1e-12) and "logit_bias" in g_acc
    _assert_grads_equal(g_acc, g_full)


def test_patch_dropout_is_replayed_exactly():
    """With patch dropout the second forward must see the same masks as the cached one."""
    model = _model(patch_dropout=0.5, attn_dropout=0.1)
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
    _assert_grads_equal(g_acc, _grads(model))


def test_naive_accumulation_is_not_the_large_batch_gradient():
    """Summing per-micro-batch losses / k (what plain gradient accumulation computes) gives each
    sample only its own micro-batch's B - 1 negatives instead of the k*B - 1 of the large batch:
    the log-sum-exp over k*B columns is not a mean of log-sum-exps over B-column subsets, so
    neither the loss nor its gradient decomposes over micro-batches. (The uniformity regulariser,
    a log of a mean over all pairs, does not decompose either.) vlp has no naive mode."""
    k = 4
    model = _model()
    micro = _batches(k, 4)
    loss_full, g_full = _run(model, [_cat(micro)])
    loss_exact, g_exact = _run(model, micro)

    model.zero_grad(set_to_none=True)
    naive = sum(Objective(LossConfig())(model(m["image"], m["text"]))[0] for m in micro) / k
    naive.backward()
    g_naive = _grads(model)

    _assert_grads_equal(g_exact, g_full)
    # at init the logits are nearly flat: each row's log-sum-exp is about log(columns), so the
    # naive loss is about log(k) lower (fewer negatives), and the gradients point elsewhere
    assert loss_exact - naive.detach() > 0.5 * torch.log(torch.tensor(float(k)))
    rel = (_flat(g_naive) - _flat(g_exact)).norm() / _flat(g_exact).norm()
    assert rel > 0.1, rel
    cosine = torch.nn.functional.cosine_similarity(_flat(g_naive), _flat(g_exact), dim=0)
    assert cosine < 0.99, cosine


# ---------------------------------------------------------------------------------------------
# 2 gloo processes with DDP: rank r's k micro-batches are the slices of one global batch

WORLD, MICRO, DIST_SEED = 2, 2, 100
REGULARISERS = dict(align_weight=0.5, uniform_weight=0.1)
DIST_CASES = {  # name: (contrastive config, contrastive blocks of the global batch)
    "gather": (dict(impl="gather"), 1),
    "tiled": (dict(impl="tiled", tile_size=3), 1),  # several tiles per direction
    "grouped": (dict(impl="grouped", group_size=1), WORLD),  # each rank's k*B rows contrast alone
}


def _loss_cfg(contrastive: dict) -> LossConfig:
    return LossConfig(contrastive=ContrastiveConfig(**contrastive), **REGULARISERS)


def _rank_micro_batches(rank, k):
    """Rank r's micro-batch i holds global samples (r*k + i)*B ... (r*k + i + 1)*B - 1: the gathered
    loss orders rows by rank, then by micro-batch within the rank (the cached features of a rank
    are concatenated before gathering). InfoNCE and the regularisers are invariant under a joint
    permutation of the rows, so gather and tiled check the samples and their pairing; grouped
    also checks which rows form each rank's block."""
    micro = _batches(WORLD * k, MICRO)
    return micro[rank * k : (rank + 1) * k]


def _rank_run(rank, world, k):
    out = {}
    for name, (contrastive, _) in DIST_CASES.items():
        ddp = wrap_model(_model(patch_dropout=0.5, attn_dropout=0.1), DistEnv(rank=rank, world=world))
        syncs = []

        def allreduce_mean(calls, bucket):
            calls.append(bucket.index())
            buffer = bucket.buffer().div_(world)
            return dist.all_reduce(buffer, async_op=True).get_future().then(lambda f: f.value()[0])

        ddp.register_comm_hook(syncs, allreduce_mean)
        torch.manual_seed(DIST_SEED + rank)  # every rank's dropout stream differs
        loss, grads = _run(ddp, _rank_micro_batches(rank, k), _loss_cfg(contrastive))
        grads = {n.removeprefix("module."): g for n, g in grads.items()}
        out[name] = {"loss": loss, "grads": grads, "syncs": syncs}
    return out


def _reference_loss(outputs, loss_cfg, blocks):
    """The objective of one process on the whole 2*k*B batch (written out: the contrastive term
    of ``grouped`` is the mean over blocks of ranks, the regularisers span every row)."""
    img, txt, scale = outputs["image_features"], outputs["text_features"], outputs["logit_scale"]
    pairs = zip(img.chunk(blocks), txt.chunk(blocks))
    contrastive = torch.stack([clip_loss(i, t, scale) for i, t in pairs]).mean()
    t = loss_cfg.uniform_t
    uniform = (uniformity_loss(img, t=t) + uniformity_loss(txt, t=t)) / 2
    return contrastive + loss_cfg.align_weight * alignment_loss(img, txt) + loss_cfg.uniform_weight * uniform


def _reference(k, contrastive, blocks):
    """One process, one autograd graph over all 2*k*B samples. A single forward of 2*k*B samples
    cannot draw the same masks (patch dropout draws one B x tokens tensor per forward, and each
    rank has its own RNG stream), so the reference forwards every rank's micro-batches in order
    from that rank's seed: the masks the accumulated run caches and replays."""
    model = _model(patch_dropout=0.5, attn_dropout=0.1)
    outs = []
    for rank in range(WORLD):
        torch.manual_seed(DIST_SEED + rank)
        outs += [model(m["image"], m["text"]) for m in _rank_micro_batches(rank, k)]
    cat = {key: torch.cat([o[key] for o in outs]) for key in ("image_features", "text_features")}
    loss = _reference_loss({**cat, "logit_scale": outs[0]["logit_scale"]}, _loss_cfg(contrastive), blocks)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("k", [2, 3])
def test_two_processes_accumulated_equal_one_process_full_batch(k):
    per_rank = run_distributed(_rank_run, WORLD, k)  # one process group for every case (spawning is slow)
    for name, (contrastive, blocks) in DIST_CASES.items():
        loss_ref, g_ref = _reference(k, contrastive, blocks)
        for rank, result in enumerate(per_rank):
            got = result[name]
            assert torch.allclose(got["loss"], loss_ref, atol=1e-12), (name, rank)
            _assert_grads_equal(got["grads"], g_ref)
            # DDP reduced each bucket once (the last micro-batch), not once per micro-batch
            assert got["syncs"] and len(got["syncs"]) == len(set(got["syncs"])), (name, got["syncs"])


def test_coca_caption_term_accumulates_to_the_full_batch_token_mean():
    """CoCa: the contrastive term spans all micro-batches (cached), the captioning term is a
    per-micro-batch token mean weighted by token counts: together the full batch's gradient, even
    with captions of different lengths in each micro-batch."""
    torch.manual_seed(0)
    model = build_model("coca_debug")[0].double().train()
    g = torch.Generator().manual_seed(2)
    micro = []
    for lengths in ([3, 9, 5], [12, 4, 7]):  # unequal token counts per micro-batch
        text = torch.zeros(len(lengths), 32, dtype=torch.long)
        for row, n in enumerate(lengths):
            text[row, 0], text[row, 1 : n - 1], text[row, n - 1] = (
                49406,
                torch.randint(1, 49000, (n - 2,), generator=g),
                49407,
            )
        image = torch.randn(len(lengths), 3, 64, 64, generator=g, dtype=torch.float64)
        micro.append({"image": image, "text": text, "caption": [""] * len(lengths)})
    loss_cfg = LossConfig(caption_weight=2.0)
    loss_k, grads_k = _run(model, micro, loss_cfg)
    loss_1, grads_1 = _run(model, [_cat(micro)], loss_cfg)
    assert loss_k.item() == pytest.approx(loss_1.item(), abs=1e-10)
    _assert_grads_equal(grads_k, grads_1)
    # and the captioning term really is in the objective (its gradient reaches the decoder)
    assert grads_1["text_decoder.text_projection"].abs().sum() > 0
