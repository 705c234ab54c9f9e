"""Published weights through the real loading path, offline: open_clip tags and ``hf-hub:`` ids
resolved by open_clip and huggingface_hub from a hub cache made in the test (tests/hub_cache.py),
Hugging Face ``CLIPModel`` folders, the preprocessing each brings, and the errors."""

from __future__ import annotations

import json
import pickle

import numpy as np
import open_clip
import pytest
import torch
from PIL import Image

import vlp
from tests.clip_benchmark_ref import assert_equals_clip_benchmark
from tests.hub_cache import add_file, add_open_clip_repo, safetensors_bytes, use_cache
from vlp.checkpoint import CheckpointError

OPENAI_REPO = "timm/vit_base_patch32_clip_224.openai"
LAION_REPO = "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"
SQUASH_REPO = "vlp-test/debug-squash"
SQUASH_PREPROCESS = {
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "interpolation": "bilinear",
    "resize_mode": "squash",
}


def _debug_cfg() -> dict:
    from vlp.checkpoint import architectures

    return architectures.config_of("debug")


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """One cache for the module: ViT-B-32 random weights under the openai and laion2b tags' repos
    (one blob, two links), a small open_clip repo with SigLIP-like preprocessing, and a repo whose
    weights file is a pickle that would run code."""
    cache = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    vit = open_clip.create_model("ViT-B-32-quickgelu")
    data = safetensors_bytes(vit.state_dict())
    add_file(cache, OPENAI_REPO, "open_clip_model.safetensors", data)
    add_file(cache, LAION_REPO, "open_clip_model.safetensors", data)
    debug = vlp.load_model("debug")[0]
    add_open_clip_repo(cache, SQUASH_REPO, _debug_cfg(), debug.state_dict(), SQUASH_PREPROCESS)
    marker = cache / "pickle_ran"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    config = {"model_cfg": _debug_cfg(), "preprocess_cfg": {}}
    add_file(cache, "vlp-test/evil", "open_clip_config.json", json.dumps(config).encode())
    add_file(cache, "vlp-test/evil", "open_clip_pytorch_model.bin", pickle.dumps({"state_dict": Evil()}))
    return cache


@pytest.fixture
def offline(hub, monkeypatch):
    use_cache(monkeypatch, hub)
    return hub


def _photo(w=97, h=61) -> Image.Image:
    """A non-square image: resize modes and crops differ on it."""
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


def _same_as_open_clip(model_name, pretrained, vlp_args, vlp_kwargs):
    ref, _, ref_pre = open_clip.create_model_and_transforms(model_name, pretrained=pretrained)
    ref_tok = open_clip.get_tokenizer(model_name)
    model, pre, tok = vlp.load_model(*vlp_args, **vlp_kwargs)
    pixels, ref_pixels = pre(_photo()), ref_pre(_photo())
    assert torch.equal(pixels, ref_pixels), "preprocessed pixels differ from open_clip's"
    texts = ["a photo of a dog", "two red cubes"]
    assert torch.equal(tok(texts), ref_tok(texts))
    with torch.no_grad():
        ref.eval()
        img = model.encode_image(pixels[None])
        txt = model.encode_text(tok(texts))
        ref_img = ref.encode_image(ref_pixels[None], normalize=True)
        ref_txt = ref.encode_text(ref_tok(texts), normalize=True)
    torch.testing.assert_close(img, ref_img, rtol=0, atol=1e-6)
    torch.testing.assert_close(txt, ref_txt, rtol=0, atol=1e-6)
    return model


def test_open_clip_tag_gives_open_clips_model_and_preprocessing(offline):
    model = _same_as_open_clip("ViT-B-32-quickgelu", "openai", ("ViT-B-32-quickgelu",), {"pretrained": "openai"})
    assert model.visual.preprocess_cfg["resize_mode"] == "shortest"


def test_hf_hub_id_gives_its_architecture_and_preprocessing(offline):
    model = _same_as_open_clip(f"hf-hub:{SQUASH_REPO}", None, (f"hf-hub:{SQUASH_REPO}",), {})
    pp = model.visual.preprocess_cfg
    assert (pp["resize_mode"], pp["interpolation"], pp["mean"]) == ("squash", "bilinear", (0.5, 0.5, 0.5))


def test_siglip_tag_brings_its_preprocessing():
    """ViT-B-16-SigLIP + webli: mean/std 0.5 and a squash resize (from open_clip's tag table; no weights read)."""
    from open_clip.transform import PreprocessCfg, image_transform_v2, merge_preprocess_dict

    from vlp.config import ModelConfig
    from vlp.data.transforms import eval_transform
    from vlp.models.pretrained import with_pretrained

    mcfg, src = with_pretrained(ModelConfig(name="ViT-B-16-SigLIP", pretrained="webli"))
    pp = mcfg.preprocess
    assert (pp.mean, pp.std, pp.resize_mode) == ([0.5] * 3, [0.5] * 3, "squash")
    ours = eval_transform(224, pp.mean, pp.std, interpolation=pp.interpolation, resize_mode=pp.resize_mode)
    cfg = merge_preprocess_dict(PreprocessCfg(size=224), open_clip.get_pretrained_cfg("ViT-B-16-SigLIP", "webli"))
    theirs = image_transform_v2(PreprocessCfg(**cfg), is_train=False)
    assert torch.equal(ours(_photo()), theirs(_photo()))


def test_quick_gelu_mismatch_is_one_line_naming_the_architecture(offline):
    with pytest.raises(
        CheckpointError, match="trained with QuickGELU but ViT-B-32 uses GELU: use model.name ViT-B-32-quickgelu"
    ):
        vlp.load_model("ViT-B-32", pretrained="openai")
    with pytest.raises(CheckpointError, match="'laion2b_s34b_b79k' is not an open_clip tag of ViT-B-32-quickgelu"):
        vlp.load_model("ViT-B-32-quickgelu", pretrained="laion2b_s34b_b79k")


def test_force_quick_gelu_is_the_override(offline):
    from vlp.config import ModelConfig
    from vlp.models.registry import build

    model, mcfg = build(ModelConfig(name="ViT-B-32", pretrained="openai", force_quick_gelu=True))
    assert type(model.visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"


def test_unknown_tag_and_offline_miss_are_one_line(offline):
    with pytest.raises(
        CheckpointError, match="'nope' is not an open_clip tag of ViT-B-32 .*its tags: .*laion2b_s34b_b79k"
    ):
        vlp.load_model("ViT-B-32", pretrained="nope")
    with pytest.raises(CheckpointError) as e:
        vlp.load_model("ViT-B-32-quickgelu", pretrained="laion400m_e31")
    msg = str(e.value)
    assert "\n" not in msg
    assert "timm/vit_base_patch32_clip_224.laion400m_e31 is not in the Hugging Face cache and HF_HUB_OFFLINE=1" in msg
    assert f"hf download timm/vit_base_patch32_clip_224.laion400m_e31 --cache-dir {offline}" in msg
    with pytest.raises(CheckpointError, match="vlp-test/missing is not in the Hugging Face cache"):
        vlp.load_model("hf-hub:vlp-test/missing")


def test_pickle_in_the_cache_is_refused_without_running(offline):
    with pytest.raises(CheckpointError, match="refused to load"):
        vlp.load_model("hf-hub:vlp-test/evil")
    assert not (offline / "pickle_ran").exists()


def test_named_architecture_must_fit_the_repo(offline):
    with pytest.raises(
        CheckpointError,
        match="model.name debug-wide is not the architecture of pretrained 'hf-hub:vlp-test/debug-squash' \\(debug",
    ):
        vlp.load_model("debug-wide", pretrained=f"hf-hub:{SQUASH_REPO}")


def _hf_clip_folder(path, act="gelu"):
    """A random transformers CLIPModel with the `debug` architecture's sizes, saved as transformers saves it."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    tower = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 2}
    config = CLIPConfig(
        text_config={**tower, "vocab_size": 49408, "max_position_embeddings": 32, "hidden_act": act,
                     "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407},
        vision_config={**tower, "image_size": 64, "patch_size": 8, "hidden_act": act},
        projection_dim=64,
    )  # fmt: skip
    torch.manual_seed(3)
    model = CLIPModel(config).eval()
    model.save_pretrained(path)
    CLIPImageProcessor(
        image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"shortest_edge": 64}, crop_size=64
    ).save_pretrained(path)
    return model


def _hf_vs_vlp(hf_model, vlp_model, tok):
    from vlp.export.hf_dir import hf_features

    pixels = torch.randn(2, 3, 64, 64)
    text = tok(["a red cube", "three green balls"])
    ref = hf_features(hf_model, pixels, text)
    with torch.no_grad():
        img, txt = vlp_model.encode_image(pixels), vlp_model.encode_text(text)
    torch.testing.assert_close(img, torch.nn.functional.normalize(ref["image"], dim=-1), rtol=0, atol=1e-5)
    torch.testing.assert_close(txt, torch.nn.functional.normalize(ref["text"], dim=-1), rtol=0, atol=1e-5)
    return pixels, text


def test_hugging_face_clip_folder_loads_and_round_trips(tmp_path):
    from tests.conftest import run_main
    from vlp.export.hf_dir import load

    folder = tmp_path / "hf_clip"
    hf_model = _hf_clip_folder(folder)
    model, pre, tok = vlp.load_model(str(folder))
    assert model.visual.preprocess_cfg["mean"] == (0.5, 0.5, 0.5)
    _hf_vs_vlp(hf_model, model, tok)
    run_main("export", "--pretrained", str(folder), "--format", "hf", "--out", str(tmp_path / "out"))
    again, _, _ = load(tmp_path / "out")
    _hf_vs_vlp(again, model, tok)


def test_hugging_face_clip_folder_with_quick_gelu_is_the_quickgelu_architecture(tmp_path):
    from vlp.checkpoint.published import describe

    _hf_clip_folder(tmp_path / "hf", act="quick_gelu")
    with pytest.raises(
        CheckpointError, match="no registered open_clip architecture builds this CLIPModel .*quick_gelu"
    ):
        describe(str(tmp_path / "hf"))


def test_vlp_eval_with_a_tag_gives_clip_benchmarks_numbers(offline, tmp_path, monkeypatch):
    """`vlp eval --model ARCH --pretrained TAG` against CLIP_benchmark's own loader
    (`clip_benchmark.models.load_clip`) and metrics for the same ARCH and TAG, on the same data."""
    import builtins

    zc = pytest.importorskip("clip_benchmark.metrics.zeroshot_classification")
    pytest.importorskip("clip_benchmark.metrics.zeroshot_retrieval")
    from clip_benchmark.models import load_clip

    from tests.conftest import run_main

    # clip-benchmark 1.6.2 calls float() on a 1-element array, which numpy >= 2.4 rejects
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    g = np.random.default_rng(0)
    classes = ["cat", "dog", "fish", "bird", "frog", "tree"]
    for c in classes:
        (tmp_path / "folder" / c).mkdir(parents=True)
        for i in range(2):
            Image.fromarray(g.integers(0, 255, (40, 70, 3), dtype=np.uint8)).save(tmp_path / "folder" / c / f"{i}.png")
    rows = [
        {"image": f"folder/{c}/{i}.png", "captions": [f"a photo of a {c} number {i}"]}
        for c in classes
        for i in range(2)
    ]
    (tmp_path / "ret.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    templates = ["a photo of a {c}.", "itap of a {c}."]
    (tmp_path / "templates.txt").write_text("\n".join(templates) + "\n")
    out = tmp_path / "ours.json"
    proc = run_main(
        "eval", "--model", "ViT-B-32-quickgelu", "--pretrained", "openai",
        "--task", "zeroshot_classification", "--data", tmp_path / "folder", "--templates", tmp_path / "templates.txt",
        "--task", "zeroshot_retrieval", "--data", tmp_path / "ret.jsonl",
        "--output", out, "--workers", "0", "--batch-size", "6",
    )  # fmt: skip
    assert "model ViT-B-32-quickgelu from pretrained 'openai'; images: 224 px" in proc.stdout
    results = json.loads(out.read_text())
    assert {r["pretrained"] for r in results} == {"openai"}
    ours = {r["task"]: r["metrics"] for r in results}

    model, preprocess, tok = load_clip("open_clip", "ViT-B-32-quickgelu", "openai", cache_dir=None, device="cpu")
    assert_equals_clip_benchmark(ours, model, preprocess, tok, tmp_path, rows, templates)


def test_training_from_a_hub_repo_saves_its_preprocessing_in_the_checkpoint(offline, shapes_shards, tmp_path):
    """`model.pretrained: hf-hub:...` starts from the repo's weights; the checkpoint's config names
    the architecture and carries the repo's preprocessing, which every later load uses."""
    from tests.conftest import run_main
    from tests.distributed import backend_run_sets
    from vlp.checkpoint import read_file

    out = tmp_path / "run"
    proc = run_main(
        "train", "--config", "configs/demo.yaml",
        *backend_run_sets(shapes_shards, out, f"model.pretrained=hf-hub:{SQUASH_REPO}", "train.steps=2"),
    )  # fmt: skip
    assert f"model debug from pretrained 'hf-hub:{SQUASH_REPO}'; images: 64 px, mean (0.5, 0.5, 0.5)" in proc.stdout
    assert "bilinear squash to a square" in proc.stdout
    ckpt = out / "checkpoints" / "step_00000002.pt"
    saved = read_file(ckpt)["config"]["model"]
    assert saved["name"] == "debug" and saved["preprocess"] == {**SQUASH_PREPROCESS}
    model, pre, _ = vlp.load_model(str(ckpt))
    assert (model.visual.preprocess_cfg["resize_mode"], model.visual.preprocess_cfg["std"]) == ("squash", (0.5,) * 3)
    ref_pre = open_clip.create_model_and_transforms(f"hf-hub:{SQUASH_REPO}")[2]
    assert torch.equal(pre(_photo()), ref_pre(_photo()))


def test_exports_carry_the_weights_preprocessing(offline, tmp_path):
    """`vlp export --pretrained hf-hub:...`: open_clip loads the folder with the repo's preprocessing,
    and vlp reads the folder back (an open_clip folder is a pretrained source too)."""
    from tests.conftest import run_main

    out = tmp_path / "oc"
    run_main("export", "--pretrained", f"hf-hub:{SQUASH_REPO}", "--format", "open_clip", "--out", str(out), "--check")
    ref, _, ref_pre = open_clip.create_model_and_transforms(f"hf-hub:{SQUASH_REPO}")
    exported, _, exp_pre = open_clip.create_model_and_transforms(f"local-dir:{out}")
    assert torch.equal(exp_pre(_photo()), ref_pre(_photo()))
    model, pre, _ = vlp.load_model(str(out))
    assert torch.equal(pre(_photo()), ref_pre(_photo()))
    with torch.no_grad():
        torch.testing.assert_close(
            model.encode_image(pre(_photo())[None]), ref.encode_image(ref_pre(_photo())[None], normalize=True)
        )


def test_hf_export_of_squash_weights_keeps_their_preprocessing(offline, tmp_path):
    """The HF image processor written for SigLIP-like weights squashes with their filter, mean and std."""
    from transformers import CLIPImageProcessor

    from tests.conftest import run_main

    out = tmp_path / "hf"
    run_main("export", "--pretrained", f"hf-hub:{SQUASH_REPO}", "--format", "hf", "--out", str(out))
    proc = CLIPImageProcessor.from_pretrained(str(out))
    assert (proc.size, proc.do_center_crop, proc.resample) == ({"height": 64, "width": 64}, False, 2)
    assert list(proc.image_mean) == [0.5] * 3 and list(proc.image_std) == [0.5] * 3


@pytest.mark.parametrize("name", ["negclip_vit_b32", "countclip_vit_b32", "lit_vit_b32_openai"])
def test_finetuning_recipes_load_and_name_published_weights(name):
    """Each recipe is a valid config whose weights are an open_clip tag of its architecture, with
    the preprocessing and QuickGELU setting the tag prescribes (no weight is read)."""
    from pathlib import Path

    from vlp.config import load_config
    from vlp.models.pretrained import with_pretrained

    path = Path(__file__).resolve().parent.parent / "configs" / "finetune" / f"{name}.yaml"
    text = path.read_text()
    assert text.startswith("# ") and "vlp train --config configs/finetune/" in text and "Aims at:" in text
    cfg = load_config(str(path), [])
    mcfg, src = with_pretrained(cfg.model)
    assert src.kind == "open_clip tag" and mcfg.preprocess.mean and mcfg.preprocess.resize_mode == "shortest"
