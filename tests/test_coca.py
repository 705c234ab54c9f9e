"""CoCa: the architecture by name, open_clip CoCa checkpoints, the captioning term of the objective
and training through the real Trainer."""

from __future__ import annotations

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import REPO

import vlp
from vlp.config import LossConfig, load_config
from vlp.losses import Objective
from vlp.losses.objective import caption_loss
from vlp.models.registry import build_model
from vlp.train.logging import read_metrics


def test_coca_architectures_build_by_name():
    model, _, _ = build_model("coca_debug")
    assert isinstance(model, open_clip.CoCa)
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 49000, (2, 32)))
    assert out["logits"].shape == (2, 31, 49408) and out["labels"].shape == (2, 31)
    assert torch.allclose(out["image_features"].norm(dim=-1), torch.ones(2), atol=1e-5)
    assert "coca_ViT-B-32" in vlp.models.registry.list_models()


def test_caption_loss_ignores_padding():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g)
    labels = torch.tensor([[3, 4, 2, 0, 0], [5, 1, 0, 0, 0]])
    keep = labels != 0
    want = F.cross_entropy(logits[keep], labels[keep])
    assert caption_loss(logits, labels) == pytest.approx(want.item(), abs=1e-6)
    noisy = logits.clone()
    noisy[~keep] = 1e3 * torch.randn(int((~keep).sum()), 11, generator=g)  # whatever is predicted at padding
    assert caption_loss(noisy, labels) == pytest.approx(want.item(), abs=1e-6)
    with pytest.raises(ValueError, match="every label token is padding"):
        caption_loss(logits, torch.zeros_like(labels))


def test_objective_weights_contrastive_and_caption_terms():
    model, _, tok = vlp.load_model("coca_debug")
    out = model(torch.randn(3, 3, 64, 64), tok(["two red circles", "a blue star", "three green squares"]))
    total, terms = Objective(LossConfig(caption_weight=2.0))(out)
    assert set(terms) == {"contrastive", "caption"}
    assert total.item() == pytest.approx(terms["contrastive"].item() + 2 * terms["caption"].item(), rel=1e-6)
    total0, terms0 = Objective(LossConfig(caption_weight=0.0))(out)
    assert set(terms0) == {"contrastive"} and total0.item() == pytest.approx(terms["contrastive"].item())


@pytest.mark.parametrize("wrap", [True, False])
def test_open_clip_coca_checkpoint_loads(tmp_path, wrap):
    model, _, _ = build_model("coca_debug")
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    path = tmp_path / "coca.pt"
    torch.save({"state_dict": sd, "epoch": 1} if wrap else sd, path)
    loaded, _, tok = vlp.load_model(str(path), model_name="coca_debug")
    model.eval()
    x, t = torch.randn(2, 3, 64, 64), tok(["a red star", "two blue crosses"])
    with torch.no_grad():
        assert torch.allclose(loaded(x, t)["logits"], model(x, t)["logits"], atol=1e-5)


def test_coca_trains_through_the_trainer_and_caption_loss_falls(shapes_shards, tmp_path):
    from vlp.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "demo_coca.yaml",
        [
            f"data.train_shards=['{shapes_shards['train']}']",
            "data.val_shards=[]",
            "eval.data=[]",
            "eval.tasks=[]",
            "data.workers=0",
            "data.batch_size=16",
            f"train.output_dir={tmp_path}",
            "train.steps=30",
            "train.warmup_steps=3",
            "train.lr=3e-3",
            "train.log_every=1",
            "train.checkpoint_every=0",
        ],
    )
    summary = Trainer(cfg).train()
    caption = [r["loss/caption"] for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/caption" in r]
    assert len(caption) == 30 and sum(caption[-5:]) / 5 < 0.7 * sum(caption[:5]) / 5, caption
    loaded, _, _ = vlp.load_model(summary["checkpoint"])
    assert isinstance(loaded, open_clip.CoCa)


def test_the_decoder_is_initialised_and_deterministic():
    """open_clip leaves CoCa's vocabulary projection as torch.empty; vlp initialises it (seeded)."""
    torch.manual_seed(3)
    a = build_model("coca_debug")[0].text_decoder.text_projection.detach().clone()
    torch.manual_seed(3)
    b = build_model("coca_debug")[0].text_decoder.text_projection.detach()
    assert torch.equal(a, b) and torch.isfinite(a).all()
    assert a.std().item() == pytest.approx(64**-0.5, rel=0.05)


def test_vlp_forward_cuts_padding_columns_and_keeps_the_loss():
    """vlp's CoCa forward runs the decoder only up to the longest caption: the same logits there as
    open_clip's forward over the whole context, and the same captioning loss."""
    model, _, tok = vlp.load_model("coca_debug")
    x, t = torch.randn(3, 3, 64, 64), tok(["a red star", "two big blue squares and a cross", "x"])
    with torch.no_grad():
        ours = model(x, t)
        theirs = open_clip.CoCa.forward(model, x, t)
    n = int((t != 0).sum(1).max()) - 1
    assert ours["logits"].shape == (3, n, 49408) and theirs["logits"].shape == (3, 31, 49408)
    assert torch.allclose(ours["logits"], theirs["logits"][:, :n], atol=1e-5)
    assert torch.equal(ours["labels"], theirs["labels"][:, :n]) and not theirs["labels"][:, n:].any()
    assert caption_loss(ours["logits"], ours["labels"]).item() == pytest.approx(
        caption_loss(theirs["logits"], theirs["labels"]).item(), abs=1e-5
    )
    assert torch.allclose(ours["image_features"], theirs["image_features"])


@pytest.mark.parametrize("lock", ["model.vision.lock=true", "model.text.lock=true"])
def test_a_coca_with_a_locked_tower_builds_and_steps(lock):
    """It used to raise TypeError: the custom build always made a CLIP."""
    from vlp.config import load_config
    from vlp.models.registry import build_model

    model, _, _ = build_model(load_config("configs/demo_coca.yaml", [lock]).model)
    assert hasattr(model, "text_decoder")
    tower = model.visual if "vision" in lock else model.text.transformer
    assert not any(p.requires_grad for p in tower.parameters())
    out = model(torch.randn(2, 3, 64, 64), torch.randint(1, 400, (2, 32)))
    assert {"image_features", "text_features", "logits", "labels"} <= set(out)
