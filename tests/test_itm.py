"""Image-text matching on CoCa's decoder: hard-negative sampling, the head, the loss, training."""

from __future__ import annotations

import pytest
import torch
from conftest import REPO

import vlp
from vlp.config import LossConfig, load_config
from vlp.losses import Objective
from vlp.models.itm import decoder_states, duplicate_captions, sample_hard_negatives
from vlp.models.registry import build_model
from vlp.train.logging import read_metrics


def _coca(itm: bool):
    torch.manual_seed(0)
    return build_model(load_config(None, ["model.name=coca_debug", f"model.itm_head={str(itm).lower()}"]).model)[0]


def test_hard_negatives_skip_positives_and_duplicates_and_follow_the_similarity():
    text = torch.tensor([[1, 2, 0], [1, 2, 0], [3, 4, 5], [6, 0, 0]])  # captions 0 and 1 are identical
    same = duplicate_captions(text)
    assert same.tolist() == [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]
    sim = torch.tensor([[0.0, 5.0, 2.0, 0.0]] * 4)
    gen = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_hard_negatives(sim, same, generator=gen) for _ in range(4000)])
    assert not bool((draws[:, 0] == 0).any() or (draws[:, 0] == 1).any())  # never itself or its duplicate
    # row 0 chooses between columns 2 and 3 with softmax([2, 0]) = 0.881 / 0.119
    assert (draws[:, 0] == 2).float().mean().item() == pytest.approx(0.881, abs=0.02)
    # row 3 may take its most similar column 1 (a different caption): e^5 / (e^0 + e^5 + e^2) = 0.946
    assert (draws[:, 3] == 1).float().mean().item() == pytest.approx(0.946, abs=0.02)


def test_hard_negative_errors_are_clear():
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool))
    text = torch.tensor([[1, 2], [1, 2]])
    with pytest.raises(ValueError, match="sample 0 has no negative"):
        sample_hard_negatives(torch.zeros(2, 2), duplicate_captions(text))


def test_decoder_states_are_the_logits_before_the_vocabulary_projection():
    model = _coca(False).eval()
    _, tok = None, vlp.load_model("coca_debug")[2]
    image_embs = model._encode_image(torch.randn(2, 3, 64, 64))[1]
    token_embs = model._encode_text(tok(["a red star", "two blue squares"]))[1]
    with torch.no_grad():
        states = decoder_states(model.text_decoder, image_embs, token_embs)
        logits = model.text_decoder(image_embs, token_embs)
    assert model.text_decoder.text_projection is not None  # put back
    assert torch.allclose(states @ model.text_decoder.text_projection, logits, atol=1e-5)


def test_itm_head_adds_matching_pairs_in_training_only():
    plain, itm = _coca(False), _coca(True)
    missing = itm.load_state_dict(plain.state_dict(), strict=False)
    assert missing.missing_keys == ["itm_head.weight", "itm_head.bias"] and not missing.unexpected_keys
    tok = vlp.load_model("coca_debug")[2]
    x, t = torch.randn(4, 3, 64, 64), tok(["a red star", "two blue squares", "a green cross", "three stars"])
    train_out = itm.train()(x, t)
    assert train_out["itm_logits"].shape == (12, 2) and train_out["itm_labels"].tolist() == [1] * 4 + [0] * 8
    total, terms = Objective(LossConfig(itm_weight=0.5))(train_out)
    assert set(terms) == {"contrastive", "caption", "itm"}
    want = terms["contrastive"] + 2.0 * terms["caption"] + 0.5 * terms["itm"]
    assert total.item() == pytest.approx(want.item(), rel=1e-6)
    total.backward()
    assert itm.itm_head.weight.grad.abs().sum() > 0
    with torch.no_grad():  # otherwise the very same CoCa outputs
        a, b = itm.eval()(x, t), plain.eval()(x, t)
    assert "itm_logits" not in a and torch.allclose(a["logits"], b["logits"], atol=1e-6)


def test_itm_head_needs_coca():
    with pytest.raises(ValueError, match="needs a CoCa architecture"):
        build_model(load_config(None, ["model.name=debug", "model.itm_head=true"]).model)


def test_coca_with_itm_trains_and_its_checkpoint_loads(shapes_shards, tmp_path):
    from vlp.train.trainer import Trainer

    cfg = load_config(
        REPO / "configs" / "demo_coca.yaml",
        [
            "model.itm_head=true",
            f"data.train_shards=['{shapes_shards['train']}']",
            "data.val_shards=[]",
            "eval.data=[]",
            "eval.tasks=[]",
            "data.workers=0",
            "data.batch_size=8",
            "data.unique_captions=true",
            f"train.output_dir={tmp_path}",
            "train.steps=4",
            "train.log_every=1",
            "train.checkpoint_every=0",
        ],
    )
    summary = Trainer(cfg).train()
    records = [r for r in read_metrics(tmp_path / "metrics.jsonl") if "loss/itm" in r]
    assert len(records) == 4 and all(0 < r["loss/itm"] < 5 for r in records)
    model, _, _ = vlp.load_model(summary["checkpoint"])
    assert hasattr(model, "itm_head")
