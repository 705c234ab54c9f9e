"""Pretrained towers: a timm image trunk and a Hugging Face text transformer from local files,
locking (LiT) and partial unlocking, the tower's preprocessing and tokenizer, weight-file mapping."""

from __future__ import annotations

import open_clip
import pytest
import timm
import torch
from conftest import tiny_tower_sets

import vlp
from vlp.checkpoint import CheckpointError
from vlp.config import ConfigError, load_config
from vlp.models.registry import build_model, image_size
from vlp.models.tokenizer import get_tokenizer
from vlp.models.towers import resolve_path, trainable_count


def _model_cfg(hf, *extra):
    return load_config(None, tiny_tower_sets(hf, *extra)).model


def _grad_names(module) -> set[str]:
    return {n for n, p in module.named_parameters() if p.requires_grad}


def test_custom_towers_build_an_open_clip_module_with_the_towers_preprocessing(tiny_hf_text):
    mcfg = _model_cfg(tiny_hf_text, "model.vision.image_size=0")
    model, mean, std = build_model(mcfg)
    assert isinstance(model, open_clip.CustomTextCLIP)
    pcfg = timm.models.get_pretrained_cfg("test_efficientnet").to_dict()
    assert image_size(model) == pcfg["input_size"][-1] == 160  # the tower's own resolution
    assert mean == tuple(pcfg["mean"]) and std == tuple(pcfg["std"])
    tok = get_tokenizer(mcfg)
    ids = tok(["a red apple", "two big dogs " * 20])
    assert ids.shape == (2, 16) and ids[0, :5].tolist() == [2, 5, 12, 18, 3]  # [CLS] a red apple [SEP]
    out = model(torch.randn(2, 3, 160, 160), ids)
    assert out["image_features"].shape == (2, 32) and out["text_features"].shape == (2, 32)
    assert torch.allclose(out["text_features"].norm(dim=-1), torch.ones(2))


def test_configured_mean_std_and_size_override_the_towers(tiny_hf_text):
    mcfg = _model_cfg(tiny_hf_text, "model.vision.mean=[0.5,0.5,0.5]", "model.vision.std=[0.25,0.25,0.25]")
    model, mean, std = build_model(mcfg)
    assert image_size(model) == 64 and mean == (0.5,) * 3 and std == (0.25,) * 3


def test_locked_towers_train_only_the_heads_and_stay_in_eval_mode(tiny_hf_text):
    model, _, _ = build_model(_model_cfg(tiny_hf_text))
    trainable = _grad_names(model)
    assert trainable and all(n.startswith(("visual.head", "text.proj", "logit_scale")) for n in trainable)
    assert trainable_count(model)[0] < trainable_count(model)[1]
    model.train()
    assert not model.visual.trunk.training and not model.text.transformer.training
    assert model.visual.head.training  # the heads do train
    bn = next(m for m in model.visual.trunk.modules() if isinstance(m, torch.nn.BatchNorm2d))
    before = bn.running_mean.clone()
    model(torch.randn(4, 3, 64, 64), torch.randint(0, 30, (4, 16)))
    assert torch.equal(bn.running_mean, before)  # a locked trunk's statistics do not move


def test_partial_unlocking_leaves_the_last_groups_and_layers_trainable(tiny_hf_text):
    model, _, _ = build_model(
        _model_cfg(tiny_hf_text, "model.vision.unlocked_groups=1", "model.text.unlocked_layers=1")
    )
    names = _grad_names(model)
    assert any(n.startswith("text.transformer.encoder.layer.1.") for n in names)
    assert not any(n.startswith("text.transformer.encoder.layer.0.") for n in names)
    assert not any(n.startswith("text.transformer.embeddings") for n in names)
    trunk = {n.removeprefix("visual.trunk.") for n in names if n.startswith("visual.trunk.")}
    assert trunk and not any(n.startswith(("conv_stem", "bn1", "blocks.0.")) for n in trunk)
    model.train()
    assert model.text.transformer.training  # partially unlocked towers train (dropout, batch norm)


def _timm_trunk_state():
    trunk = timm.create_model("test_efficientnet", pretrained=False, num_classes=0, global_pool="")
    gen = torch.Generator().manual_seed(3)
    sd = trunk.state_dict()
    for name, t in sd.items():  # "pretrained": every tensor differs from a fresh init, sensibly scaled
        if name.endswith("running_var"):
            t.uniform_(0.5, 1.5, generator=gen)
        elif t.is_floating_point():
            t.add_(0.1 * torch.randn(t.shape, generator=gen))
    return sd


def test_weights_file_by_names_and_by_order(tiny_hf_text, tmp_path):
    sd = _timm_trunk_state()
    by_name = tmp_path / "trunk.pt"
    torch.save({**sd, "classifier.weight": torch.zeros(1000, 256), "classifier.bias": torch.zeros(1000)}, by_name)
    # another codebase's port: the same tensors in the same order under other names, then its classifier
    ported = {f"_blocks.{i}.w": v for i, v in enumerate(sd.values())}
    ported.update({"_fc.weight": torch.zeros(1000, 256), "_fc.bias": torch.zeros(1000)})
    by_order = tmp_path / "ported.pth"
    torch.save(ported, by_order)
    for path, match in ((by_name, "names"), (by_order, "order")):
        model, _, _ = build_model(
            _model_cfg(tiny_hf_text, f"model.vision.weights={path}", f"model.vision.weights_match={match}")
        )
        got = model.visual.trunk.state_dict()
        assert all(torch.equal(got[k], v) for k, v in sd.items()), match


def test_weights_file_that_does_not_fit_names_the_tensor(tiny_hf_text, tmp_path):
    sd = _timm_trunk_state()
    items = list(sd.items())
    items[0] = ("stem", torch.zeros(7, 3, 3, 3))
    bad = tmp_path / "bad.pth"
    torch.save(dict(items), bad)
    with pytest.raises(CheckpointError, match="'stem'.*conv_stem.weight"):
        build_model(_model_cfg(tiny_hf_text, f"model.vision.weights={bad}", "model.vision.weights_match=order"))
    short = tmp_path / "short.pth"
    torch.save(dict(items[1:]), short)
    with pytest.raises(CheckpointError, match="tensors .*trunk has"):
        build_model(_model_cfg(tiny_hf_text, f"model.vision.weights={short}", "model.vision.weights_match=order"))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(_model_cfg(tiny_hf_text, f"model.vision.weights={tmp_path / 'missing.pth'}"))


def test_pkg_paths_resolve_inside_installed_packages_or_say_what_to_install():
    path = resolve_path("pkg://open_clip/model_configs/ViT-B-32.json")
    assert path.is_file() and path.parent.name == "model_configs"
    with pytest.raises(FileNotFoundError, match="pip install no-such-weights-pkg"):
        resolve_path("pkg://no_such_weights_pkg/w.pth", "model.vision.weights")
    with pytest.raises(FileNotFoundError, match="does not exist in the installed package 'open_clip'"):
        resolve_path("pkg://open_clip/nothing/here.pth")


def test_text_folder_without_config_is_a_clear_error(tmp_path, tiny_hf_text):
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        build_model(_model_cfg(tiny_hf_text, f"model.text.hf_model_name_or_path={tmp_path / 'empty'}"))


def test_custom_model_needs_both_towers_and_a_width():
    with pytest.raises(ConfigError, match="model.embed_dim"):
        load_config(None, ["model.name=custom"])
    with pytest.raises(ConfigError, match="model.vision.timm_model_name"):
        load_config(None, ["model.name=custom", "model.embed_dim=8"])


def test_text_tower_on_a_named_architecture_keeps_its_image_tower(tiny_hf_text):
    mcfg = load_config(None, ["model.name=debug", f"model.text.hf_model_name_or_path={tiny_hf_text}"]).model
    model, _, _ = build_model(mcfg)
    assert isinstance(model, open_clip.CustomTextCLIP) and image_size(model) == 64
    ref, _, _ = build_model("debug")
    assert type(model.visual) is type(ref.visual)


def test_checkpoint_of_custom_towers_loads_without_the_tower_weight_files(tiny_hf_text, tmp_path):
    sd = _timm_trunk_state()
    weights = tmp_path / "trunk.pt"
    torch.save(sd, weights)
    cfg = load_config(None, tiny_tower_sets(tiny_hf_text, f"model.vision.weights={weights}"))
    model, _, _ = build_model(cfg.model)
    ckpt = tmp_path / "ckpt.pt"
    torch.save({"format": "vlp-checkpoint-v1", "model": model.state_dict(), "config": cfg.to_dict()}, ckpt)
    weights.unlink()  # the checkpoint holds every weight; the trunk file is no longer needed
    loaded, preprocess, tok = vlp.load_model(str(ckpt))
    model.eval()
    x, ids = torch.randn(2, 3, 64, 64), tok(["a red apple", "a dog"])
    with torch.no_grad():
        assert torch.allclose(loaded.encode_image(x), model.encode_image(x), atol=1e-6)
        assert torch.allclose(loaded.encode_text(ids), model.encode_text(ids), atol=1e-6)


@pytest.mark.parametrize("unlocked", [0, 2])
def test_locking_keeps_the_trunk_function(tiny_hf_text, tmp_path, unlocked):
    """Locking must not change what the trunk computes (open_clip's batch-norm freezing drops the
    activation of timm's BatchNormAct2d; vlp uses timm's)."""
    sd = _timm_trunk_state()
    weights = tmp_path / "trunk.pt"
    torch.save(sd, weights)
    mcfg = _model_cfg(tiny_hf_text, f"model.vision.weights={weights}", f"model.vision.unlocked_groups={unlocked}")
    model, _, _ = build_model(mcfg)
    ref = timm.create_model("test_efficientnet", pretrained=False, num_classes=0)
    ref.load_state_dict(sd)
    ref.eval(), model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.allclose(model.visual.trunk(x), ref(x), rtol=1e-4, atol=1e-5)
    frozen_bn = [m for m in model.visual.trunk.modules() if "Frozen" in type(m).__name__]
    assert bool(frozen_bn) == bool(unlocked)  # a fully locked trunk keeps its modules and state-dict keys


def test_unlocking_more_groups_than_the_trunk_has_is_an_error(tiny_hf_text):
    with pytest.raises(ValueError, match="unlocked_groups=50.*layer groups"):
        build_model(_model_cfg(tiny_hf_text, "model.vision.unlocked_groups=50"))


def test_partially_unlocked_towers_train_through_the_stream(shapes_shards, tiny_hf_text, tmp_path):
    """Not fully locked: no feature cache; the stream tokenizes with the Hugging Face tokenizer and
    the unlocked layers move while the locked ones stay."""
    from conftest import REPO

    from vlp.train.trainer import Trainer

    sets = tiny_tower_sets(tiny_hf_text, "model.vision.unlocked_groups=1", "model.text.unlocked_layers=1")
    cfg = load_config(
        REPO / "configs" / "demo.yaml",
        sets + [
            f"data.train_shards=['{shapes_shards['train']}']", "data.val_shards=[]", "eval.data=[]",
            "data.workers=1", "data.batch_size=8", f"train.output_dir={tmp_path}", "train.steps=3",
            "train.warmup_steps=0", "train.lr=0.01", "train.checkpoint_every=0",
        ],
    )  # fmt: skip
    trainer = Trainer(cfg)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()
    after = trainer.model.state_dict()
    assert not trainer.cached and not (tmp_path / "feature_cache").exists()
    assert torch.equal(before["text.transformer.embeddings.word_embeddings.weight"],
                       after["text.transformer.embeddings.word_embeddings.weight"])  # fmt: skip
    assert not torch.equal(before["text.transformer.encoder.layer.1.output.dense.weight"],
                           after["text.transformer.encoder.layer.1.output.dense.weight"])  # fmt: skip
    assert torch.equal(before["visual.trunk.conv_stem.weight"], after["visual.trunk.conv_stem.weight"])
    assert not torch.equal(before["visual.trunk.conv_head.weight"], after["visual.trunk.conv_head.weight"])
