"""A Hugging Face transformers ``CLIPModel`` folder read as an open_clip CLIP: the inverse of
``vlp export --format hf`` (see the key table in :mod:`vlp.export.hf_mapping`).

``config.json`` becomes an open_clip architecture dict (a ViT image tower and a causal text
transformer with CLIP's pooling; ``hidden_act: quick_gelu`` becomes ``quick_gelu: true``), the
weights are renamed (the separate query, key and value projections stacked into
``nn.MultiheadAttention``'s ``in_proj``), and ``preprocessor_config.json`` gives the image mean,
std and resampling filter. Weights are read from safetensors or with ``weights_only=True``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vlp.checkpoint.files import CheckpointError, read_file

WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_ACTIVATIONS = {"quick_gelu": True, "gelu": False}
_RESAMPLE = {2: "bilinear", 3: "bicubic"}  # PIL's resampling ids in a preprocessor config


def model_type(folder: Path) -> str | None:
    """``model_type`` of a transformers folder's ``config.json`` (None: not such a folder)."""
    config = Path(folder) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
        raise CheckpointError(f"{config}: not a readable transformers config ({e})") from None


def architecture(folder: Path) -> dict:
    """The open_clip architecture dict of a ``CLIPModel`` folder; CheckpointError naming the
    option when the network is not one open_clip builds."""
    config_path = Path(folder) / "config.json"
    cfg = json.loads(config_path.read_text(encoding="utf-8"))
    vision, text = cfg.get("vision_config") or {}, cfg.get("text_config") or {}
    acts = {vision.get("hidden_act", "quick_gelu"), text.get("hidden_act", "quick_gelu")}
    if len(acts) != 1 or not acts <= set(_ACTIVATIONS):
        raise CheckpointError(
            f"{config_path}: hidden_act {sorted(acts)}: open_clip builds both towers with one activation, "
            "gelu or quick_gelu"
        )
    try:
        v_width, t_width = int(vision["hidden_size"]), int(text["hidden_size"])
        return {
            "embed_dim": int(cfg.get("projection_dim", 512)),
            "quick_gelu": _ACTIVATIONS[acts.pop()],
            "vision_cfg": {
                "image_size": int(vision["image_size"]),
                "layers": int(vision["num_hidden_layers"]),
                "width": v_width,
                "head_width": v_width // int(vision["num_attention_heads"]),
                "patch_size": int(vision["patch_size"]),
                "mlp_ratio": int(vision["intermediate_size"]) / v_width,
            },
            "text_cfg": {
                "context_length": int(text["max_position_embeddings"]),
                "vocab_size": int(text["vocab_size"]),
                "width": t_width,
                "heads": int(text["num_attention_heads"]),
                "layers": int(text["num_hidden_layers"]),
                "mlp_ratio": int(text["intermediate_size"]) / t_width,
            },
        }
    except KeyError as e:
        raise CheckpointError(f"{config_path}: {e.args[0]} missing from a CLIP config") from None


def preprocess(folder: Path) -> dict:
    """mean, std and interpolation from ``preprocessor_config.json`` (CLIPImageProcessor resizes the
    shortest side and centre-crops: open_clip's ``shortest`` mode); {} when there is none."""
    path = Path(folder) / "preprocessor_config.json"
    if not path.is_file():
        return {}
    pp = json.loads(path.read_text(encoding="utf-8"))
    out = {"resize_mode": "shortest"}
    if "image_mean" in pp:
        out["mean"] = tuple(float(x) for x in pp["image_mean"])
    if "image_std" in pp:
        out["std"] = tuple(float(x) for x in pp["image_std"])
    if pp.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[pp["resample"]]
    return out


def _weight_files(folder: Path) -> list[Path]:
    for name in INDEX_FILES:
        index = folder / name
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
            return [folder / s for s in shards]
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(f"{folder}: a CLIPModel config but no weights ({' or '.join(WEIGHT_FILES)})")


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The folder's weights renamed to an open_clip ``CLIP``'s state-dict keys."""
    hf: dict[str, torch.Tensor] = {}
    for path in _weight_files(Path(folder)):
        hf.update(read_file(path))
    hf = {k: v for k, v in hf.items() if not k.endswith("position_ids")}
    try:
        return to_open_clip(hf)
    except KeyError as e:
        raise CheckpointError(f"{folder}: {e.args[0]} missing from the CLIPModel weights") from None


def to_open_clip(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers ``CLIPModel`` keys -> open_clip ``CLIP`` keys; CheckpointError on leftovers."""
    used: set[str] = set()

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return hf[key]

    out: dict[str, torch.Tensor] = {}

    def weight_bias(dst: str, src: str) -> None:
        out[f"{dst}.weight"], out[f"{dst}.bias"] = take(f"{src}.weight"), take(f"{src}.bias")

    def blocks(dst: str, src: str) -> None:
        i = 0
        while f"{src}.{i}.layer_norm1.weight" in hf:
            d, s = f"{dst}.{i}", f"{src}.{i}"
            for kind in ("weight", "bias"):
                parts = [take(f"{s}.self_attn.{p}_proj.{kind}") for p in "qkv"]
                out[f"{d}.attn.in_proj_{kind}"] = torch.cat(parts, dim=0)
            for oc, name in (
                ("attn.out_proj", "self_attn.out_proj"),
                ("mlp.c_fc", "mlp.fc1"),
                ("mlp.c_proj", "mlp.fc2"),
            ):
                weight_bias(f"{d}.{oc}", f"{s}.{name}")
            weight_bias(f"{d}.ln_1", f"{s}.layer_norm1")
            weight_bias(f"{d}.ln_2", f"{s}.layer_norm2")
            i += 1

    out["visual.class_embedding"] = take("vision_model.embeddings.class_embedding")
    out["visual.conv1.weight"] = take("vision_model.embeddings.patch_embedding.weight")
    out["visual.positional_embedding"] = take("vision_model.embeddings.position_embedding.weight")
    weight_bias("visual.ln_pre", "vision_model.pre_layrnorm")
    blocks("visual.transformer.resblocks", "vision_model.encoder.layers")
    weight_bias("visual.ln_post", "vision_model.post_layernorm")
    out["visual.proj"] = take("visual_projection.weight").t().contiguous()
    out["token_embedding.weight"] = take("text_model.embeddings.token_embedding.weight")
    out["positional_embedding"] = take("text_model.embeddings.position_embedding.weight")
    blocks("transformer.resblocks", "text_model.encoder.layers")
    weight_bias("ln_final", "text_model.final_layer_norm")
    out["text_projection"] = take("text_projection.weight").t().contiguous()
    out["logit_scale"] = take("logit_scale").reshape(())
    left = sorted(set(hf) - used)
    if left:
        raise CheckpointError(f"{len(left)} CLIPModel tensors have no place in open_clip's CLIP (e.g. {left[:4]})")
    return out
