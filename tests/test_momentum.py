"""Momentum distillation: the EMA teacher, its feature queues (one process and two gloo ranks),
the distilled contrastive loss against a dense fp64 reference (1 and 2 ranks), state round-trip."""

from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from tests.distributed import run_distributed
from vlp.losses import clip_loss, distilled_clip_loss
from vlp.models.momentum import MomentumTeacher, alpha_at
from vlp.models.registry import build_model

N, D, K, W = 8, 8, 5, 2  # loss tests: global batch, feature dim, queue rows, ranks


def _debug(seed=0):
    torch.manual_seed(seed)
    return build_model("debug")[0]


def _batch(model, b=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, 64, 64, generator=g)
    text = torch.randint(1, 1000, (b, model.context_length), generator=g)
    return image, text


def _unit(*shape, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


# -- EMA teacher ------------------------------------------------------------------------------


def test_update_is_the_ema_of_the_student():
    student = _debug()
    teacher = MomentumTeacher(student, momentum=0.75, queue_size=8)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # dyadic values: m * old + (1 - m) * new is exact in float32 whatever the kernel
        for p in teacher.model.parameters():
            p.copy_(torch.randint(-64, 64, p.shape, generator=g) / 16)
        for p in student.parameters():
            p.copy_(torch.randint(-64, 64, p.shape, generator=g) / 16)
        student.attn_mask.fill_(-3.0)
    old = {n: p.clone() for n, p in teacher.model.named_parameters()}
    teacher.update(student)
    for name, s in student.named_parameters():
        assert torch.equal(teacher.model.get_parameter(name), 0.75 * old[name] + 0.25 * s), name
    assert torch.equal(teacher.model.attn_mask, student.attn_mask)  # buffers are copied as they are

    teacher = MomentumTeacher(_debug(seed=2), momentum=0.995)  # the default momentum, random weights
    old = {n: p.clone() for n, p in teacher.model.named_parameters()}
    teacher.update(student)
    for name, s in student.named_parameters():
        want = 0.995 * old[name] + (1 - 0.995) * s
        assert torch.allclose(teacher.model.get_parameter(name), want, rtol=0, atol=1e-6), name


def test_teacher_is_frozen_and_stays_in_eval_mode():
    student = _debug()
    teacher = MomentumTeacher(student, queue_size=8)
    image, text = _batch(student)
    out = student(image, text)
    t_img, t_txt = teacher.features(image, text)
    assert t_img.shape == t_txt.shape == (2, 64) and t_img.dtype == torch.float32 and not t_img.requires_grad
    assert torch.allclose(t_img.norm(dim=-1), torch.ones(2)) and torch.allclose(t_txt.norm(dim=-1), torch.ones(2))
    distilled_clip_loss(
        out["image_features"], out["text_features"], out["logit_scale"], t_img, t_txt, alpha=0.4
    ).backward()
    assert all(p.grad is not None for p in student.parameters() if p.requires_grad)
    assert all(not p.requires_grad and p.grad is None for p in teacher.parameters())
    teacher.train()
    assert not any(m.training for m in teacher.modules())
    assert teacher.train(True) is teacher


def test_coca_teacher_features():
    torch.manual_seed(0)
    coca = build_model("coca_debug")[0]
    teacher = MomentumTeacher(coca, queue_size=8)
    image, text = _batch(coca)
    t_img, t_txt = teacher.features(image, text)
    assert t_img.shape == t_txt.shape == (2, 64)
    with torch.no_grad():
        out = coca(image, text)  # the teacher is an exact copy: the student's own features
    assert torch.allclose(t_img, out["image_features"], atol=1e-6)
    assert torch.allclose(t_txt, out["text_features"], atol=1e-6)


def test_mismatched_student_raises():
    teacher = MomentumTeacher(_debug(), queue_size=8)
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="do not match the momentum teacher's: unexpected"):
        teacher.update(build_model("coca_debug")[0])
    other = _debug()
    other.text_projection = torch.nn.Parameter(torch.zeros(64, 32))
    with pytest.raises(ValueError, match=r"parameter text_projection has shape \(64, 32\), .* \(64, 64\)"):
        teacher.update(other)
    with pytest.raises(ValueError, match="momentum must be in"):
        MomentumTeacher(other, momentum=1.5)


# -- queues -----------------------------------------------------------------------------------


def _rows(start, count, dim=4):
    """Rows whose entries are their global index: easy to follow through the queue."""
    return torch.arange(start, start + count, dtype=torch.float32)[:, None].expand(count, dim).clone()


def test_enqueue_wraps_around_and_queue_returns_filled_rows():
    teacher = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=8)
    img, txt = teacher.queue()
    assert img.shape == txt.shape == (0, 0)
    teacher.enqueue(_rows(0, 3), -_rows(0, 3))
    assert teacher.queue_image.shape == (8, 4) and int(teacher.ptr) == 3 and int(teacher.filled) == 3
    img, txt = teacher.queue()
    assert torch.equal(img, _rows(0, 3)) and torch.equal(txt, -_rows(0, 3))
    teacher.enqueue(_rows(3, 3), -_rows(3, 3))
    assert int(teacher.ptr) == 6 and int(teacher.filled) == 6 and torch.equal(teacher.queue()[0], _rows(0, 6))
    teacher.enqueue(_rows(6, 3), -_rows(6, 3))  # rows 6, 7, then 8 wraps to slot 0
    assert int(teacher.ptr) == 1 and int(teacher.filled) == 8
    want = torch.tensor([8, 1, 2, 3, 4, 5, 6, 7], dtype=torch.float32)[:, None].expand(8, 4)
    img, txt = teacher.queue()
    assert torch.equal(img, want) and torch.equal(txt, -want)
    teacher.enqueue(_rows(9, 3), -_rows(9, 3))  # slots 1, 2, 3
    assert int(teacher.ptr) == 4 and int(teacher.filled) == 8
    assert torch.equal(teacher.queue()[0][:, 0], torch.tensor([8.0, 9, 10, 11, 4, 5, 6, 7]))


def test_enqueue_errors_and_global_batch_check():
    teacher = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=8)
    with pytest.raises(ValueError, match="cannot enqueue 9 rows"):
        teacher.enqueue(_rows(0, 9), _rows(0, 9))
    with pytest.raises(ValueError, match="two B x D tensors"):
        teacher.enqueue(_rows(0, 3), _rows(0, 2))
    teacher.enqueue(_rows(0, 3), _rows(0, 3))
    with pytest.raises(ValueError, match="5-d features into a queue of 4-d"):
        teacher.enqueue(_rows(0, 3, dim=5), _rows(0, 3, dim=5))
    big = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=65536)
    msg = (
        "loss.distill.queue_size=65536 must be a multiple of the global batch 96 "
        "(data.batch_size x world size x train.accum_steps)"
    )
    with pytest.raises(ValueError, match=f"^{re.escape(msg)}$"):
        big.check_global_batch(96)
    for ok in (1, 64, 512, 65536):
        big.check_global_batch(ok)
    off = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=0)  # no queue: enqueue is a no-op
    off.check_global_batch(96)
    off.enqueue(_rows(0, 3), _rows(0, 3))
    assert off.queue()[0].shape[0] == 0


def _step_rows(step, rank=None, b=3):
    """Global batch of 2 * b rows for ``step``; rank r's share is rows [r * b, (r + 1) * b)."""
    g = torch.Generator().manual_seed(100 + step)
    img, txt = torch.randn(2 * b, 4, generator=g), torch.randn(2 * b, 4, generator=g)
    if rank is None:
        return img, txt
    return img[rank * b : (rank + 1) * b], txt[rank * b : (rank + 1) * b]


def _enqueue_run(rank, world):
    teacher = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=8)
    for step in range(3):  # 6 rows a step into 8: the second and third enqueues wrap around
        teacher.enqueue(*_step_rows(step, rank))
    return {k: v.clone() for k, v in teacher.state_dict().items() if not k.startswith("model.")}


# -- loss -------------------------------------------------------------------------------------


def _reference(img, txt, s, t_img, t_txt, alpha, q_img=None, q_txt=None):
    """Dense, one process: every column written out, soft targets through F.cross_entropy."""
    n = img.shape[0]
    cols_txt = txt if q_txt is None else torch.cat([txt, q_txt])
    cols_img = img if q_img is None else torch.cat([img, q_img])
    t_cols_txt = t_txt if q_txt is None else torch.cat([t_txt, q_txt])
    t_cols_img = t_img if q_img is None else torch.cat([t_img, q_img])
    onehot = torch.eye(n, cols_txt.shape[0], dtype=img.dtype)
    with torch.no_grad():
        y_i2t = alpha * torch.softmax(s * t_img @ t_cols_txt.T, 1) + (1 - alpha) * onehot
        y_t2i = alpha * torch.softmax(s * t_txt @ t_cols_img.T, 1) + (1 - alpha) * onehot
    i2t = F.cross_entropy(s * img @ cols_txt.T, y_i2t)
    t2i = F.cross_entropy(s * txt @ cols_img.T, y_t2i)
    return (i2t + t2i) / 2


def _inputs():
    leaves = {
        "img": _unit(N, D, seed=0),
        "txt": _unit(N, D, seed=1),
        "scale": torch.tensor(10.0, dtype=torch.float64),
    }
    leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
    # a teacher close to the student, as after EMA; queues of earlier teacher features
    teacher = {
        "t_img": F.normalize(leaves["img"].detach() + 0.3 * _unit(N, D, seed=2), dim=-1),
        "t_txt": F.normalize(leaves["txt"].detach() + 0.3 * _unit(N, D, seed=3), dim=-1),
        "q_img": _unit(K, D, seed=4),
        "q_txt": _unit(K, D, seed=5),
    }
    return leaves, teacher


def _ours(leaves, teacher, alpha, queue, sl=slice(None), group=None):
    q = dict(queue_image=teacher["q_img"], queue_text=teacher["q_txt"]) if queue else {}
    return distilled_clip_loss(
        leaves["img"][sl],
        leaves["txt"][sl],
        leaves["scale"],
        teacher["t_img"][sl],
        teacher["t_txt"][sl],
        alpha=alpha,
        group=group,
        **q,
    )


def _grads(leaves):
    return {k: v.grad.clone() for k, v in leaves.items()}


@pytest.mark.parametrize("queue", [False, True], ids=["no-queue", "queue"])
@pytest.mark.parametrize("alpha", [0.0, 0.4])
def test_loss_equals_dense_reference(alpha, queue):
    leaves, teacher = _inputs()
    ours = _ours(leaves, teacher, alpha, queue)
    ours.backward()
    got = _grads(leaves)
    ref_leaves, teacher = _inputs()
    q = (teacher["q_img"], teacher["q_txt"]) if queue else ()
    ref = _reference(
        ref_leaves["img"], ref_leaves["txt"], ref_leaves["scale"], teacher["t_img"], teacher["t_txt"], alpha, *q
    )
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0), (ours, ref)
    for name, leaf in ref_leaves.items():
        assert torch.allclose(got[name], leaf.grad, atol=1e-12, rtol=0), name


def test_alpha_zero_without_queue_is_clip_loss():
    leaves, teacher = _inputs()
    empty = torch.zeros(0, D, dtype=torch.float64)
    ours = distilled_clip_loss(
        leaves["img"],
        leaves["txt"],
        leaves["scale"],
        teacher["t_img"],
        teacher["t_txt"],
        alpha=0.0,
        queue_image=empty,
        queue_text=empty,
    )
    ours.backward()
    got = _grads(leaves)
    clip_leaves, _ = _inputs()
    ref = clip_loss(clip_leaves["img"], clip_leaves["txt"], clip_leaves["scale"], impl="gather")
    ref.backward()
    assert torch.allclose(ours, ref, atol=1e-12, rtol=0)
    for name, leaf in clip_leaves.items():
        assert torch.allclose(got[name], leaf.grad, atol=1e-12, rtol=0), name


def test_loss_errors():
    leaves, t = _inputs()
    img, txt, s = leaves["img"], leaves["txt"], leaves["scale"]
    with pytest.raises(ValueError, match="B x D alike"):
        distilled_clip_loss(img, txt, s, t["t_img"][:4], t["t_txt"], alpha=0.4)
    with pytest.raises(ValueError, match="both queues"):
        distilled_clip_loss(img, txt, s, t["t_img"], t["t_txt"], alpha=0.4, queue_image=t["q_img"])
    with pytest.raises(ValueError, match="queues must both be K x 8"):
        distilled_clip_loss(
            img, txt, s, t["t_img"], t["t_txt"], alpha=0.4, queue_image=t["q_img"], queue_text=t["q_txt"][:2]
        )
    with pytest.raises(ValueError, match="alpha must be in"):
        distilled_clip_loss(img, txt, s, t["t_img"], t["t_txt"], alpha=1.2)


def _loss_run(rank, world):
    leaves, teacher = _inputs()
    b = N // world
    loss = _ours(leaves, teacher, 0.4, True, slice(rank * b, (rank + 1) * b))
    loss.backward()
    return {"loss": loss.detach(), **_grads(leaves)}


def _rank_run(rank, world):
    return {"queue": _enqueue_run(rank, world), "loss": _loss_run(rank, world)}


@pytest.fixture(scope="module")
def two_ranks():
    return run_distributed(_rank_run, W)  # one process group for every distributed check (spawning is slow)


def test_two_rank_queues_are_identical_and_equal_single_process(two_ranks):
    single = MomentumTeacher(torch.nn.Linear(2, 2), queue_size=8)
    for step in range(3):
        single.enqueue(*_step_rows(step))
    want = {k: v for k, v in single.state_dict().items() if not k.startswith("model.")}
    for r in two_ranks:
        assert r["queue"].keys() == want.keys()
        for k, v in want.items():
            assert torch.equal(r["queue"][k], v), k
    assert int(want["ptr"]) == 2 and int(want["filled"]) == 8


def test_two_rank_loss_and_gradients_equal_single_process(two_ranks):
    leaves, teacher = _inputs()
    ref = _ours(leaves, teacher, 0.4, True)  # one process, global batch: checked against the reference above
    ref.backward()
    results = [r["loss"] for r in two_ranks]
    for r in results:
        assert torch.allclose(r["loss"], ref.detach(), atol=1e-12, rtol=0)
    # scale: a parameter, DDP averages the ranks' gradients; features: each rank's slice / W (the DDP mean)
    assert torch.allclose(torch.stack([r["scale"] for r in results]).mean(), leaves["scale"].grad, atol=1e-12)
    b = N // W
    for name in ("img", "txt"):
        got = torch.cat([r[name][i * b : (i + 1) * b] for i, r in enumerate(results)]) / W
        assert torch.allclose(got, leaves[name].grad, atol=1e-12, rtol=0), name


# -- state and schedule -----------------------------------------------------------------------


def test_state_dict_round_trips_into_a_fresh_teacher():
    student = _debug()
    teacher = MomentumTeacher(student, momentum=0.9, queue_size=8)
    image, text = _batch(student, b=3)
    for step in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.01 * (step + 1))
        teacher.update(student)
        teacher.enqueue(*teacher.features(image, text))
    state = teacher.state_dict()

    fresh = MomentumTeacher(_debug(seed=5), momentum=0.9, queue_size=8)
    assert fresh.queue_image.shape == (0, 0)
    fresh.load_state_dict(state)
    loaded = fresh.state_dict()
    assert loaded.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(loaded[k], v), k
    assert int(fresh.ptr) == 1 and int(fresh.filled) == 8
    assert all(torch.equal(a, b) for a, b in zip(fresh.queue(), teacher.queue()))
    # both continue identically (the host copy of ``filled`` was refreshed on load)
    for t in (teacher, fresh):
        t.enqueue(*t.features(image, text))
    assert all(torch.equal(a, b) for a, b in zip(fresh.queue(), teacher.queue()))

    # a teacher that never enqueued loads into one that did: the queues are empty again
    fresh.load_state_dict(MomentumTeacher(student, queue_size=8).state_dict())
    assert fresh.queue_image.shape == (0, 0) and fresh.queue()[0].shape == (0, 0) and int(fresh.filled) == 0
    with pytest.raises(RuntimeError, match="saved momentum queue has 8 rows but loss.distill.queue_size=16"):
        MomentumTeacher(student, queue_size=16).load_state_dict(state)


def test_alpha_warmup():
    assert alpha_at(0, 100) == 0.0
    assert alpha_at(50, 100) == pytest.approx(0.2)
    assert alpha_at(100, 100) == pytest.approx(0.4)
    assert alpha_at(250, 100) == pytest.approx(0.4)
    assert alpha_at(0, 0) == 0.4 and alpha_at(7, 0, alpha=0.3) == 0.3
    assert alpha_at(25, 100, alpha=0.8) == pytest.approx(0.2)
    with pytest.raises(ValueError, match="warm-up"):
        alpha_at(1, -1)


def _albef_config(shards, out, *extra):
    from tests.conftest import REPO
    from vlp.config import load_config

    return load_config(
        REPO / "configs" / "demo_albef.yaml",
        [
            f"data.train_shards=['{shards['train']}']",
            "data.val_shards=[]",
            "eval.data=[]",
            "eval.tasks=[]",
            "data.workers=0",
            "data.batch_size=8",
            "loss.distill.queue_size=32",
            "loss.distill.alpha_warmup_steps=4",
            f"train.output_dir={out}",
            "train.steps=6",
            "train.warmup_steps=2",
            "train.log_every=1",
            "train.checkpoint_every=3",
            *extra,
        ],
    )


def test_trainer_distills_saves_the_teacher_and_resumes_it_exactly(shapes_shards, tmp_path):
    import shutil

    from vlp.config import ConfigError
    from vlp.train.logging import read_metrics
    from vlp.train.trainer import Trainer

    full, cut = tmp_path / "full", tmp_path / "cut"
    trainer = Trainer(_albef_config(shapes_shards, full))
    assert trainer.teacher is not None and not trainer.cached
    assert all(id(p) not in {id(q) for g in trainer.optimizer.param_groups for q in g["params"]}
               for p in trainer.teacher.parameters())  # fmt: skip
    trainer.train()
    records = [r for r in read_metrics(full / "metrics.jsonl") if "loss" in r]
    assert [r["distill/alpha"] for r in records] == pytest.approx([0.0, 0.1, 0.2, 0.3, 0.4, 0.4])
    state = torch.load(full / "checkpoints" / "step_00000006.pt", weights_only=True)
    assert int(state["teacher"]["filled"]) == 32 and int(state["teacher"]["ptr"]) == (6 * 8) % 32
    # the teacher is the EMA of the weights, not the weights
    assert not torch.equal(state["teacher"]["model.logit_scale"], state["model"]["logit_scale"])
    # a run killed after step 3 resumes with the teacher and its queue as they were
    shutil.copytree(full, cut)
    (cut / "checkpoints" / "step_00000006.pt").unlink()
    (cut / "checkpoints" / "latest").write_text("step_00000003.pt")
    resumed = Trainer(_albef_config(shapes_shards, cut, "train.resume=latest"))
    resumed.train()
    again = torch.load(cut / "checkpoints" / "step_00000006.pt", weights_only=True)
    for key, value in state["teacher"].items():
        assert torch.allclose(again["teacher"][key].float(), value.float(), atol=1e-6), key
    a = {r["step"]: r["loss"] for r in records}
    b = {r["step"]: r["loss"] for r in read_metrics(cut / "metrics.jsonl") if "loss" in r}
    assert all(b[s] == pytest.approx(a[s], abs=1e-5) for s in (4, 5, 6)), (a, b)
    with pytest.raises(ConfigError, match="multiple of the global batch 24"):
        Trainer(_albef_config(shapes_shards, tmp_path / "bad", "data.batch_size=24"))


@pytest.mark.slow
def test_distillation_under_torchrun_two_processes(shapes_shards, tmp_path):
    """DDP: each rank's teacher features feed the loss and one shared queue (all-gathered)."""
    import os
    import subprocess

    from tests.conftest import REPO
    from tests.distributed import torchrun_cmd
    from vlp.train.logging import read_metrics

    out = tmp_path / "ddp"
    sets = [
        f"data.train_shards=['{shapes_shards['train']}']", "data.val_shards=[]", "eval.data=[]", "eval.tasks=[]",
        "data.workers=1", "data.batch_size=8", "loss.distill.queue_size=64", "loss.distill.alpha_warmup_steps=2",
        f"train.output_dir={out}", "train.steps=4", "train.log_every=1", "train.checkpoint_every=0",
    ]  # fmt: skip
    cmd = torchrun_cmd("vlp.train", ["--config", "configs/demo_albef.yaml", *[a for s in sets for a in ("--set", s)]])
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    records = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    assert [r["distill/alpha"] for r in records] == pytest.approx([0.0, 0.2, 0.4, 0.4])
    state = torch.load(out / "checkpoints" / "step_00000004.pt", weights_only=True)
    assert state["world"] == 2 and int(state["teacher"]["filled"]) == 4 * 16  # both ranks' 8 per step


def test_coca_trains_with_distillation_and_captioning(shapes_shards, tmp_path):
    from vlp.train.logging import read_metrics
    from vlp.train.trainer import Trainer

    Trainer(_albef_config(shapes_shards, tmp_path, "model.name=coca_debug", "train.steps=3")).train()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert len(records) == 3 and all("loss/caption" in r and "loss/contrastive" in r for r in records)
    assert records[-1]["distill/alpha"] == pytest.approx(0.2)
    state = torch.load(tmp_path / "checkpoints" / "step_00000003.pt", weights_only=True)
    assert "model.text_decoder.text_projection" in state["teacher"] and int(state["teacher"]["filled"]) == 24
