"""DeGLA's grounded contrasts, the counting loss and the minimal-pair loss: the B x K layout and its
masks against a per-sample reference, the counting and pair formulas, and 1 vs 2 gloo ranks (fp64, 1e-9)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from vlp.losses.hard_negatives import (
    counting_loss,
    image_grounded_loss,
    negative_columns,
    own_negatives_mask,
    pair_groups,
    pair_loss,
    text_grounded_loss,
)

N, K, D = 8, 3, 6


def _leaves(seed=0):
    g = torch.Generator().manual_seed(seed)
    unit = lambda *shape: F.normalize(torch.randn(*shape, D, generator=g, dtype=torch.float64), dim=-1)  # noqa: E731
    leaves = {"img": unit(N), "txt": unit(N), "neg": unit(N, K), "teacher": unit(N), "cf": unit(N)}
    leaves["scale"] = torch.tensor(12.0, dtype=torch.float64)
    out = {k: v.clone().requires_grad_(k != "teacher") for k, v in leaves.items()}
    out["has_cf"] = torch.tensor([1, 0, 1, 1, 0, 1, 0, 1], dtype=torch.bool)
    # the pair (0, 1) and the group (4, 5, 6); rows 2 and 7 have ids of their own, row 3 none (-1);
    # each half is a rank's
    out["pair_id"] = torch.tensor([10, 10, 11, -1, 12, 12, 12, 3])
    return out


def _ce_first(first_B, rest_BK):
    """Per sample: -log softmax([first, rest...])[0], averaged."""
    return (torch.logsumexp(torch.cat([first_B[:, None], rest_BK], 1), 1) - first_B).mean()


def _reference(name, x):
    """Per-sample, hand-written: no flattened columns, no masks."""
    if name == "image_grounded":
        pos = x["scale"] * (x["img"] * x["txt"]).sum(-1)
        return _ce_first(pos, x["scale"] * torch.einsum("bd,bkd->bk", x["img"], x["neg"]))
    if name == "text_grounded":
        pos = 10.0 * (x["txt"] * x["teacher"]).sum(-1)
        return _ce_first(pos, 10.0 * torch.einsum("bd,bkd->bk", x["txt"], x["neg"]))
    if name == "pair":
        terms, s = [], x["scale"]
        for b in range(N):
            group = [c for c in range(N) if x["pair_id"][c] == x["pair_id"][b] >= 0]
            if len(group) < 2:
                continue
            pos = torch.exp(s * x["img"][b] @ x["txt"][b])
            texts = sum(torch.exp(s * x["img"][b] @ x["txt"][c]) for c in group)
            images = sum(torch.exp(s * x["img"][c] @ x["txt"][b]) for c in group)
            terms.append(-torch.log(pos / texts) - torch.log(pos / images))
        return torch.stack(terms).mean()
    s_pos = x["scale"] * (x["img"] * x["txt"]).sum(-1)
    s_cf = x["scale"] * (x["img"] * x["cf"]).sum(-1)
    per = -torch.log(torch.exp(s_pos) / (torch.exp(s_pos) + torch.exp(s_cf)))
    return per[x["has_cf"]].mean()


def _ours(name, x, sl=slice(None), group=None):
    if name == "image_grounded":
        return image_grounded_loss(x["img"][sl], x["txt"][sl], x["neg"][sl], x["scale"], group)
    if name == "text_grounded":
        return text_grounded_loss(x["txt"][sl], x["teacher"][sl], x["neg"][sl], 10.0, group)
    if name == "pair":
        return pair_loss(x["img"][sl], x["txt"][sl], x["pair_id"][sl], x["scale"], group)
    return counting_loss(x["img"][sl], x["txt"][sl], x["cf"][sl], x["has_cf"][sl], x["scale"], group)


NAMES = ["image_grounded", "text_grounded", "counting", "pair"]


def test_pair_groups():
    ids = torch.tensor([10, 10, 11, -1, 12, 12, 12, 3, 3, -1] + [7] * 5)
    same, has = pair_groups(ids)
    # two to four rows with one id make a group; an id on five rows is a bad id: none of them
    assert has.tolist() == [True, True, False, False, True, True, True, True, True, False] + [False] * 5
    assert same[4].nonzero().flatten().tolist() == [4, 5, 6] and same[0].nonzero().flatten().tolist() == [0, 1]
    assert not same[2].any() and not same[10:].any() and torch.equal(same, same.t())


def test_the_pair_loss_of_a_pair_is_two_softplus_terms():
    x = _leaves()
    s, (a, b) = x["scale"], (0, 1)
    img, txt = x["img"].detach(), x["txt"].detach()
    expected = 0.0
    for i, j in ((a, b), (b, a)):
        pos = s * img[i] @ txt[i]
        expected += F.softplus(s * img[i] @ txt[j] - pos) + F.softplus(s * img[j] @ txt[i] - pos)
    ids = torch.tensor([5, 5, -1, -1, -1, -1, -1, -1])
    assert torch.allclose(pair_loss(img, txt, ids, s), expected / 2, rtol=0, atol=1e-12)


def test_pair_loss_without_pairs_is_zero_and_checks_shapes():
    x = _leaves()
    loss = pair_loss(x["img"], x["txt"], torch.full((N,), -1), x["scale"])
    assert loss.item() == 0.0
    loss.backward()
    assert x["img"].grad.abs().sum() == 0
    with pytest.raises(ValueError, match="pair_id has shape"):
        pair_loss(x["img"], x["txt"], x["pair_id"][:4], x["scale"])


def test_the_layout_is_sample_major_and_the_mask_follows_it():
    cols = negative_columns(4, 3)
    assert cols.tolist() == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    mask = own_negatives_mask(4, 3)
    flat = torch.randn(4, 3, 5).reshape(12, 5)
    for b in range(4):
        assert mask[b].nonzero().squeeze(1).tolist() == cols[b].tolist()
        assert torch.equal(flat[mask[b]], flat.view(4, 3, 5)[b])  # the columns are sample b's own rows
    # DeGLA's text-grounded mask tiles the diagonal (type-major): for B, K >= 2 it picks other samples'
    # negatives under the sample-major layout every other part of its code (and vlp) uses
    tiled = torch.eye(4, dtype=torch.bool).repeat(1, 3)
    assert not torch.equal(tiled, mask) and torch.equal(torch.eye(4, dtype=torch.bool).repeat_interleave(3, 1), mask)


@pytest.mark.parametrize("name", NAMES)
def test_single_process_equals_the_per_sample_reference(name):
    ours, ref = _leaves(), _leaves()
    a, b = _ours(name, ours), _reference(name, ref)
    assert a.item() == pytest.approx(b.item(), abs=1e-12)
    a.backward(), b.backward()
    for k in ("img", "txt", "neg", "cf", "scale"):
        if ref[k].grad is not None:
            assert torch.allclose(ours[k].grad, ref[k].grad, atol=1e-12), (name, k)


def test_counting_loss_without_counterfactuals_is_zero():
    x = _leaves()
    x["has_cf"][:] = False
    loss = _ours("counting", x)
    assert loss.item() == 0.0
    loss.backward()
    assert x["img"].grad.abs().sum() == 0


def test_shape_errors():
    x = _leaves()
    with pytest.raises(ValueError, match="B x K x D"):
        image_grounded_loss(x["img"], x["txt"], x["neg"].reshape(N * K, D), x["scale"])
    with pytest.raises(ValueError, match="B x D alike"):
        text_grounded_loss(x["txt"], x["teacher"][:4], x["neg"])


def _rank_run(rank, world):
    out = []
    for name in NAMES:
        x = _leaves()
        b = N // world
        loss = _ours(name, x, slice(rank * b, (rank + 1) * b), torch.distributed.group.WORLD)
        loss.backward()
        out.append({"loss": loss.detach(), **{k: v.grad.clone() for k, v in x.items() if v.grad is not None}})
    return out


def test_two_ranks_equal_one_process():
    results = run_distributed(_rank_run, 2)
    for i, name in enumerate(NAMES):
        ref = _leaves()
        loss = _reference(name, ref)
        loss.backward()
        for r in results:
            assert r[i]["loss"].item() == pytest.approx(loss.item(), abs=1e-9), name
        for k in ("img", "txt", "neg", "cf", "scale"):
            if ref[k].grad is None:
                continue
            if k == "scale":  # a parameter: DDP averages the ranks' gradients
                got = torch.stack([r[i][k] for r in results]).mean()
            else:  # each rank's gradient of its own rows, divided by W (DDP's mean)
                got = torch.cat([r[i][k][j * 4 : (j + 1) * 4] for j, r in enumerate(results)]) / 2
            assert torch.allclose(got, ref[k].grad, atol=1e-9), (name, k)
