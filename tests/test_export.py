"""``vlp export``: each format reloaded by its own library (open_clip alone, transformers alone, vlp)
reproduces the checkpoint's features; unmappable architectures, unsafe pickles and occupied output
folders are refused before anything is written.

Vectors are perturbed away from their initialisation (LayerNorms at 1/0, attention biases at 0
would hide a swapped or misplaced tensor); matrices are random already."""

from __future__ import annotations

import json
import os
import pickle

import open_clip
import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_tower_sets
from PIL import Image

import vlp
from vlp.checkpoint import CHECKPOINT_FORMAT, CheckpointError
from vlp.cli import main
from vlp.config import ModelConfig, load_config
from vlp.export import (
    ExportError,
    ExportSource,
    export_checkpoint,
    export_model,
    hf_dir,
    load_safetensors,
    load_source,
    open_clip_dir,
    safetensors_file,
)
from vlp.export.parity import parity_batch
from vlp.models.registry import CONFIG_DIR, build_model

CAPTIONS = ["a photo of a cat", "two red squares to the left of a blue circle", "A big DOG, sleeping!"]


def _perturb(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim <= 1:
                p.add_(0.1 * torch.randn(p.shape, generator=generator))
    return model.eval()


def _vlp_checkpoint(path, *sets: str):
    """A checkpoint as the trainer saves it (format, model, config), weights perturbed."""
    cfg = load_config(None, list(sets))
    torch.manual_seed(0)
    model, _, _ = build_model(cfg.model)
    state = {"format": CHECKPOINT_FORMAT, "step": 1, "model": _perturb(model).state_dict(), "config": cfg.to_dict()}
    torch.save(state, path)
    return path


def _normalized(model, pixels, ids):
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=False)
        txt = model.encode_text(ids, normalize=False)
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def _max_diff(a, b) -> float:
    return float((a - b).abs().max())


@pytest.fixture(scope="module")
def debug_ckpt(tmp_path_factory):
    return _vlp_checkpoint(tmp_path_factory.mktemp("ckpt") / "step_00000001.pt", "model.name=debug")


@pytest.fixture(scope="module")
def debug_ref(debug_ckpt):
    """The checkpoint as vlp loads it, fixed inputs and its normalised features on them."""
    model, preprocess, tokenizer = vlp.load_model(str(debug_ckpt))
    pixels = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ids = tokenizer(CAPTIONS)
    img, txt = _normalized(model, pixels, ids)
    return {"model": model, "preprocess": preprocess, "pixels": pixels, "ids": ids, "image": img, "text": txt}


def test_open_clip_folder_loads_in_open_clip_with_the_same_features(debug_ckpt, debug_ref, tmp_path):
    out = tmp_path / "oc"
    info = export_checkpoint(debug_ckpt, "open_clip", out)
    assert sorted(info["files"]) == ["open_clip_config.json", "open_clip_model.safetensors"]
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    assert torch.equal(tokenizer(CAPTIONS), debug_ref["ids"])
    img, txt = _normalized(model.eval(), debug_ref["pixels"], debug_ref["ids"])
    assert _max_diff(img, debug_ref["image"]) < 1e-5 and _max_diff(txt, debug_ref["text"]) < 1e-5
    norm = [t for t in preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(norm.mean) == tuple(open_clip.OPENAI_DATASET_MEAN)
    saved = json.loads((out / "export.json").read_text())
    assert saved["complete"] and saved["architecture"] == "debug" and saved["source"] == str(debug_ckpt)


def test_hf_folder_loads_in_transformers_with_the_same_features(debug_ckpt, debug_ref, tmp_path):
    from transformers import CLIPModel, CLIPProcessor

    out = tmp_path / "hf"
    export_checkpoint(debug_ckpt, "hf", out)
    model = CLIPModel.from_pretrained(str(out), use_safetensors=True).eval()
    assert model.config.vision_config.hidden_act == "gelu" and model.config.text_config.eos_token_id == 49407
    with torch.no_grad():
        hf = hf_dir.hf_features(model, debug_ref["pixels"], debug_ref["ids"])
        src = debug_ref["model"]
        raw_img = src.encode_image(debug_ref["pixels"], normalize=False)
        raw_txt = src.encode_text(debug_ref["ids"], normalize=False)
    assert _max_diff(hf["image"], raw_img) < 1e-4 and _max_diff(hf["text"], raw_txt) < 1e-4
    assert _max_diff(F.normalize(hf["image"], dim=-1), debug_ref["image"]) < 1e-4
    assert _max_diff(F.normalize(hf["text"], dim=-1), debug_ref["text"]) < 1e-4
    assert abs(hf["logit_scale"] - src.logit_scale.exp()).item() < 1e-6

    processor = CLIPProcessor.from_pretrained(str(out))
    ids = processor.tokenizer(CAPTIONS, padding="max_length", max_length=32)["input_ids"]
    for ours, theirs in zip(debug_ref["ids"].tolist(), ids):
        end = ours.index(49407) + 1  # padding aside: open_clip pads with 0, CLIPTokenizer with end-of-text
        assert theirs[:end] == ours[:end]
    image = Image.fromarray((torch.rand(64, 64, 3, generator=torch.Generator().manual_seed(2)) * 255).byte().numpy())
    pixels = processor(images=image, return_tensors="pt")["pixel_values"][0]
    assert _max_diff(pixels, debug_ref["preprocess"](image)) < 1e-5  # at the model's size: no resampling


def test_hf_mapping_follows_quick_gelu_and_a_separate_text_tower(tmp_path):
    """``quick_gelu`` and ``custom_text`` (open_clip's CustomTextCLIP: the text tower under ``text.``)."""
    arch = json.loads((CONFIG_DIR / "debug.json").read_text())
    arch.update(quick_gelu=True, custom_text=True)
    arch["vision_cfg"]["norm_kwargs"] = arch["text_cfg"]["norm_kwargs"] = {"eps": 1e-6}
    (tmp_path / "export-test-quickgelu.json").write_text(json.dumps(arch))
    open_clip.add_model_config(tmp_path / "export-test-quickgelu.json")
    ckpt = _vlp_checkpoint(tmp_path / "ckpt.pt", "model.name=export-test-quickgelu")
    info = export_checkpoint(ckpt, "hf", tmp_path / "hf", check=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "quick_gelu" and config["vision_config"]["layer_norm_eps"] == 1e-6
    assert info["parity"]["ok"] and info["parity"]["text_features_raw"] < 1e-4, info["parity"]


def test_safetensors_file_rebuilds_the_model_in_vlp(debug_ckpt, debug_ref, tmp_path):
    from safetensors import safe_open

    out = tmp_path / "st"
    export_checkpoint(debug_ckpt, "safetensors", out)
    path = out / "model.safetensors"
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["vlp_format"] == "vlp-safetensors-v1" and meta["vlp_version"] == vlp.__version__
    assert json.loads(meta["model_config"])["name"] == "debug"
    model, mean, std = load_safetensors(path)
    ref_sd = debug_ref["model"].state_dict()
    assert all(torch.equal(v, ref_sd[k]) for k, v in model.state_dict().items()) and len(ref_sd) == len(
        model.state_dict()
    )
    img, txt = _normalized(model, debug_ref["pixels"], debug_ref["ids"])
    assert _max_diff(img, debug_ref["image"]) == 0 and _max_diff(txt, debug_ref["text"]) == 0
    # what `vlp eval --checkpoint DIR/model.safetensors [--model debug]` runs: the metadata names the architecture
    for name in ("debug", None):
        evaluated, _, _ = vlp.load_model(str(path), name)
        assert _max_diff(_normalized(evaluated, debug_ref["pixels"], debug_ref["ids"])[0], debug_ref["image"]) == 0
    # and the export is itself a source: its architecture comes from the metadata
    assert load_source(path).kind == "vlp safetensors export"


def test_vit_b32_matches_in_every_format(tmp_path):
    """A randomly initialised (and perturbed) open_clip ViT-B-32, one small batch per format."""
    model, mean, std = build_model("ViT-B-32")
    source = ExportSource(tmp_path / "in-memory", "test", _perturb(model), ModelConfig(name="ViT-B-32"), mean, std)
    batch = parity_batch(source, batch=1, captions=("a photo of a cat",))
    for fmt, adapter in (("open_clip", open_clip_dir), ("hf", hf_dir)):
        export_model(source, fmt, tmp_path / fmt)
        parity = adapter.check(source, tmp_path / fmt, batch)  # reloaded by open_clip / transformers alone
        assert parity["ok"] and parity["max_abs_diff"] < 1e-4, (fmt, parity)
        assert parity["image_features"] < 1e-5 and parity["text_features"] < 1e-5, (fmt, parity)
    export_model(source, "safetensors", tmp_path / "st")
    path = tmp_path / "st" / "model.safetensors"
    from safetensors.torch import load_file

    assert safetensors_file.exported_model_config(path) == source.model_cfg
    written, state = load_file(str(path)), source.state_dict
    assert written.keys() == state.keys() and all(torch.equal(written[k], state[k]) for k in state)


def test_open_clip_checkpoint_file_needs_its_architecture(debug_ref, tmp_path):
    plain = tmp_path / "open_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in debug_ref["model"].state_dict().items()}}, plain)
    with pytest.raises(ExportError, match="--model NAME"):
        export_checkpoint(plain, "open_clip", tmp_path / "a")
    assert not (tmp_path / "a").exists()
    info = export_checkpoint(plain, "open_clip", tmp_path / "b", model_name="debug", check=True)
    assert info["source_kind"] == "open_clip checkpoint" and info["parity"]["ok"]
    with pytest.raises(ExportError, match="folder but not a DeepSpeed checkpoint"):
        load_source(tmp_path)


def test_deepspeed_folder_is_read_through_its_consolidation(debug_ckpt, tmp_path, monkeypatch):
    """The dispatch only; consolidating ZeRO shards is tests/test_deepspeed.py's."""
    from vlp.checkpoint import kinds

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    monkeypatch.setattr(kinds, "is_deepspeed_checkpoint", lambda path: path == folder)
    monkeypatch.setattr(kinds, "read_as_vlp_checkpoint", lambda path: torch.load(debug_ckpt))
    info = export_checkpoint(folder, "safetensors", tmp_path / "st")
    assert info["source_kind"] == "vlp DeepSpeed checkpoint" and info["architecture"] == "debug"


def test_coca_is_refused_for_hf_and_exported_for_open_clip_without_its_itm_head(tmp_path):
    ckpt = _vlp_checkpoint(tmp_path / "coca.pt", "model.name=coca_debug", "model.itm_head=true")
    with pytest.raises(ExportError, match="CoCa.*--format open_clip"):
        export_checkpoint(ckpt, "hf", tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
    info = export_checkpoint(ckpt, "open_clip", tmp_path / "oc", check=True)
    assert info["left_out"] == ["itm_head.weight", "itm_head.bias"] and info["parity"]["ok"], info


def test_resnet_and_pretrained_towers_are_refused_for_hf_but_not_for_open_clip(tmp_path, tiny_hf_text):
    # vlp's own debug-resnet (a tiny ModifiedResNet image tower): open_clip reloads it with the same features
    ckpt = _vlp_checkpoint(tmp_path / "rn.pt", "model.name=debug-resnet")
    with pytest.raises(ExportError, match="ResNet image tower"):
        export_checkpoint(ckpt, "hf", tmp_path / "out")
    info = export_checkpoint(ckpt, "open_clip", tmp_path / "oc-rn", check=True)
    assert info["parity"]["ok"], info
    ckpt = _vlp_checkpoint(tmp_path / "towers.pt", *tiny_tower_sets(tiny_hf_text))
    with pytest.raises(ExportError, match="timm image tower.*HFTextEncoder text tower"):
        export_checkpoint(ckpt, "hf", tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # open_clip takes them, the text tower's tokenizer copied into the folder (where open_clip reads it)
    info = export_checkpoint(ckpt, "open_clip", tmp_path / "oc", check=True)
    assert "tokenizer_config.json" in info["files"] and info["parity"]["ok"], info


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_pickle_that_would_run_code_is_refused(tmp_path, capsys):
    marker, evil = tmp_path / "code-ran", tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"format": CHECKPOINT_FORMAT, "model": _RunsCode(str(marker))}, protocol=2))
    with pytest.raises(CheckpointError, match="refused"):
        load_source(evil)
    assert main(["export", "--checkpoint", str(evil), "--format", "safetensors", "--out", str(tmp_path / "o")]) == 2
    assert "refused to load" in capsys.readouterr().err
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_output_folder_is_never_written_over_by_surprise(debug_ckpt, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="--force"):
        export_checkpoint(debug_ckpt, "hf", out)
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    export_checkpoint(debug_ckpt, "hf", out, force=True)
    assert (out / "notes.txt").read_text() == "mine" and (out / "model.safetensors").is_file()
    export_checkpoint(debug_ckpt, "open_clip", out)  # a vlp export folder: its old files go first
    assert not (out / "model.safetensors").exists() and not (out / "vocab.json").exists()
    assert (out / "notes.txt").exists() and json.loads((out / "export.json").read_text())["format"] == "open_clip"
    with pytest.raises(ExportError, match="is a file"):
        export_checkpoint(debug_ckpt, "hf", out / "notes.txt")


def test_cli_export_prints_where_and_the_measured_parity(debug_ckpt, tmp_path, capsys):
    out = tmp_path / "hf"
    args = ["export", "--checkpoint", str(debug_ckpt), "--format", "hf", "--out", str(out), "--check"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert str(out) in printed and "CLIPModel.from_pretrained" in printed and "max abs diff" in printed
    saved = json.loads((out / "export.json").read_text())
    assert saved["complete"] and saved["parity"]["ok"] and saved["parity"]["tokenizer_ids_equal"]
    assert main(["export", "--checkpoint", str(tmp_path / "missing.pt"), "--format", "hf", "--out", str(out)]) == 2
