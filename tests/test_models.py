"""Model registry, tokenizer, and loading weights from vlp and open_clip checkpoint files."""

from __future__ import annotations

import pickle

import open_clip
import pytest
import torch
from PIL import Image

import vlp
from vlp.checkpoint import CheckpointError
from vlp.models.registry import UnknownModelError, build_model, get_model_config, list_models


def test_registry_lists_open_clip_and_vlp_archs():
    names = list_models()
    assert "debug" in names and "ViT-B-32" in names and "RN50" in names
    cfg = get_model_config("debug")
    assert cfg["vision_cfg"]["patch_size"] == 8 and "layers" in cfg["text_cfg"]  # ViT + transformer towers


def test_unknown_model_suggests_close_names():
    with pytest.raises(UnknownModelError, match="unknown model 'ViT-B-33'.*ViT-B-32"):
        get_model_config("ViT-B-33")


def test_debug_model_is_an_open_clip_module_with_normalised_features():
    model, mean, std = build_model("debug")
    assert isinstance(model, open_clip.CLIP)
    assert tuple(mean) == tuple(open_clip.OPENAI_DATASET_MEAN)
    out = model(torch.randn(3, 3, 64, 64), torch.randint(0, 1000, (3, 32)))
    assert out["image_features"].shape == (3, 64)
    assert torch.allclose(model.encode_image(torch.randn(2, 3, 64, 64)).norm(dim=-1), torch.ones(2))
    assert torch.allclose(model.encode_text(torch.randint(0, 1000, (2, 32))).norm(dim=-1), torch.ones(2))
    assert torch.isclose(out["logit_scale"], model.logit_scale.exp())  # the multiplier, not its log


def test_tokenizer_shapes():
    _, _, tok = vlp.load_model("debug")
    ids = tok(["three red circles", "", "word " * 100])
    assert ids.shape == (3, 32) and ids.dtype == torch.long
    assert ids[2, -1] == 49407  # truncated texts keep the end-of-text token


def _save_open_clip_style(model, path, wrap: bool):
    sd = {f"module.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": sd, "epoch": 3} if wrap else sd, path)


@pytest.mark.parametrize("wrap", [True, False])
def test_load_open_clip_checkpoint_file(tmp_path, wrap):
    model, _, _ = build_model("debug")
    path = tmp_path / "oc.pt"
    _save_open_clip_style(model, path, wrap)
    loaded, preprocess, tok = vlp.load_model(str(path), model_name="debug")
    x = preprocess(Image.new("RGB", (90, 70), (10, 200, 30))).unsqueeze(0)
    assert x.shape == (1, 3, 64, 64)
    model.eval()
    assert torch.equal(loaded.encode_image(x), model.encode_image(x))
    with pytest.raises(CheckpointError, match="not a vlp checkpoint: pass model_name"):
        vlp.load_model(str(path))


def test_pretrained_config_key_loads_the_file(tmp_path):
    model, _, _ = build_model("debug")
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    again, _, _ = build_model("debug", pretrained=str(path))
    for k, v in model.state_dict().items():
        assert torch.equal(v, again.state_dict()[k])


def test_mismatched_architecture_is_a_clear_error(tmp_path):
    model, _, _ = build_model("debug")
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    with pytest.raises(CheckpointError, match="do not fit architecture 'ViT-S-32'.*missing.*other shapes"):
        build_model("ViT-S-32", pretrained=str(path))


class _Evil:
    def __reduce__(self):
        return (print, ("this ran",))


def test_pickle_with_code_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Evil()}, f)
    with pytest.raises(CheckpointError, match="refused to load"):
        vlp.load_model(str(path), model_name="debug")


def test_truncated_checkpoint_is_a_clear_error(tmp_path):
    model, _, _ = build_model("debug")
    path = tmp_path / "w.pt"
    torch.save(model.state_dict(), path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="truncated or not a torch checkpoint"):
        vlp.load_model(str(path), model_name="debug")


def test_checksum_sidecar_or_text_file_is_named_for_what_it_is(tmp_path):
    sidecar = tmp_path / "step_00000600.pt.sha256"
    sidecar.write_text("0" * 64)
    with pytest.raises(CheckpointError, match=r"not a torch checkpoint .*the checkpoint is .*step_00000600\.pt$"):
        vlp.load_model(str(sidecar), model_name="debug")
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match="not a torch checkpoint \\(an empty file\\)"):
        vlp.load_model(str(empty), model_name="debug")
