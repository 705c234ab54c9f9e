"""Towers from pretrained weights: a timm image trunk and a Hugging Face text transformer.

``model.vision.timm_model_name`` / ``model.text.hf_model_name_or_path`` replace the towers of the
``model.name`` architecture (or define them all with ``model.name: custom``); the result is still a
genuine open_clip ``CLIP`` / ``CustomTextCLIP`` module, so its state dict, export and tokenizer are
open_clip's. Weights come from local files only: a path, or ``pkg://module/relative/path`` for
data shipped inside an installed Python package (resolved where that package is installed).
Locking follows LiT: a frozen trunk is kept in eval mode (no dropout, no batch-norm updates), so
its features are a fixed function of the input and can be cached (:mod:`vlp.train.feature_cache`).
"""

from __future__ import annotations

import copy
import importlib.util
import logging
from pathlib import Path

import torch

from vlp.models.loading import CheckpointError, extract_state_dict, read_file

log = logging.getLogger(__name__)
PKG = "pkg://"
CLASSIFIER_PREFIXES = ("fc.", "_fc.", "classifier.", "head.fc.", "head.")  # ImageNet heads a CLIP trunk drops


def resolve_path(spec: str, key: str = "path") -> Path:
    """``pkg://module/rel/path`` -> that file inside the installed package ``module``; else ``spec``.

    Raises FileNotFoundError naming ``key`` and, for a package, the pip name to install.
    """
    if not spec.startswith(PKG):
        return Path(spec).expanduser()
    module, _, rel = spec[len(PKG) :].partition("/")
    found = importlib.util.find_spec(module)
    if found is None or not found.submodule_search_locations:
        pip_name = module.replace("_", "-")
        raise FileNotFoundError(
            f"{key} = {spec}: Python package '{module}' is not installed (pip install {pip_name}, or "
            f"pip install 'vlp[real]' for the packages of configs/lit_openclipart.yaml)"
        )
    path = Path(next(iter(found.submodule_search_locations))) / rel
    if not path.exists():
        raise FileNotFoundError(f"{key} = {spec}: {path} does not exist in the installed package '{module}'")
    return path


def _timm_pretrained_cfg(name: str) -> dict:
    import timm

    try:
        cfg = timm.models.get_pretrained_cfg(name)
    except Exception:  # an unknown tag or a timm without pretrained configs for this model
        cfg = None
    return cfg.to_dict() if cfg is not None else {}


def open_clip_config(mcfg) -> dict:
    """The open_clip architecture dict for a vlp ``ModelConfig`` (towers replaced as configured)."""
    from vlp.models.registry import get_model_config

    if mcfg.name == "custom":
        cfg = {"embed_dim": mcfg.embed_dim, "vision_cfg": {}, "text_cfg": {}}
    else:
        cfg = copy.deepcopy(get_model_config(mcfg.name))
    if mcfg.embed_dim:
        cfg["embed_dim"] = mcfg.embed_dim
    v, t = mcfg.vision, mcfg.text
    if v.timm_model_name:
        _require("timm", "model.vision.timm_model_name")
        pcfg = _timm_pretrained_cfg(v.timm_model_name)
        size = v.image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
        cfg["vision_cfg"] = {
            "timm_model_name": v.timm_model_name,
            "timm_model_pretrained": False,  # weights come from model.vision.weights, never a download
            "timm_pool": v.pool,
            "timm_proj": v.proj,
            "image_size": size,
        }
        cfg["preprocess_cfg"] = {
            "size": size,
            "mean": tuple(v.mean or pcfg.get("mean", (0.485, 0.456, 0.406))),
            "std": tuple(v.std or pcfg.get("std", (0.229, 0.224, 0.225))),
        }
    elif v.mean or v.std:
        cfg["preprocess_cfg"] = {"mean": tuple(v.mean), "std": tuple(v.std)} if v.mean and v.std else {}
    if t.hf_model_name_or_path:
        _require("transformers", "model.text.hf_model_name_or_path")
        path = _hf_location(t.hf_model_name_or_path)
        cfg["text_cfg"] = {
            "hf_model_name": path,
            "hf_tokenizer_name": path,
            "hf_model_pretrained": t.pretrained,
            "hf_proj_type": t.proj,
            "hf_pooler_type": t.pooler,
            "context_length": t.context_length,
        }
        cfg["custom_text"] = True
    return cfg


def _require(module: str, key: str) -> None:
    if importlib.util.find_spec(module) is None:
        raise ModuleNotFoundError(f"{key} needs the '{module}' package: pip install {module} (or 'vlp[real]')")


def _hf_location(spec: str) -> str:
    """A local folder (``pkg://`` resolved) must exist and hold config.json; other names are hub ids."""
    looks_local = spec.startswith((PKG, "/", ".", "~")) or Path(spec).expanduser().exists()
    if not looks_local:
        return spec
    path = resolve_path(spec, "model.text.hf_model_name_or_path")
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.text.hf_model_name_or_path = {spec}: {path} is not a Hugging Face model folder "
            "(no config.json; expected the folder save_pretrained() writes)"
        )
    return str(path)


def build_custom(mcfg, device="cpu") -> torch.nn.Module:
    """Instantiate the open_clip module for ``open_clip_config(mcfg)``, load tower weights, lock."""
    import open_clip

    cfg = open_clip_config(mcfg)
    preprocess = cfg.pop("preprocess_cfg", {})
    custom_text = cfg.pop("custom_text", False)
    cls = open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    model = cls(**cfg, output_dict=True)
    model.visual.preprocess_cfg = {**(getattr(model.visual, "preprocess_cfg", {}) or {}), **preprocess}
    if mcfg.vision.weights:
        load_trunk_weights(model.visual, mcfg.vision.weights, mcfg.vision.weights_match)
    lock_towers(model, mcfg)
    return model.to(device)


def needs_custom_build(mcfg) -> bool:
    return (
        mcfg.name == "custom"
        or bool(mcfg.vision.timm_model_name or mcfg.text.hf_model_name_or_path or mcfg.embed_dim)
        or bool(mcfg.vision.lock or mcfg.text.lock or mcfg.vision.mean or mcfg.vision.std)
    )


def load_trunk_weights(visual: torch.nn.Module, spec: str, match: str = "names") -> None:
    """Load a local weights file into a timm tower's trunk (strict, shapes checked).

    ``match="order"``: the file holds the trunk's tensors in the trunk's order under other names
    (a port from another codebase); a trailing ImageNet classifier in the file is ignored.
    Raises FileNotFoundError / CheckpointError saying what does not fit.
    """
    trunk = getattr(visual, "trunk", None)
    if trunk is None:
        raise CheckpointError("model.vision.weights needs a timm image tower (set model.vision.timm_model_name)")
    path = resolve_path(spec, "model.vision.weights")
    sd = extract_state_dict(read_file(path))
    own = trunk.state_dict()
    if match == "order":
        items = list(sd.items())
        while len(items) > len(own) and items[-1][0].startswith(CLASSIFIER_PREFIXES):
            items.pop()
        if len(items) != len(own):
            raise CheckpointError(
                f"{path}: {len(items)} tensors (after dropping a trailing classifier) but the "
                f"'{type(trunk).__name__}' trunk has {len(own)}; weights_match=order needs the same tensors in order"
            )
        mapped = {}
        for (src, tensor), (dst, mine) in zip(items, own.items()):
            if tuple(tensor.shape) != tuple(mine.shape):
                raise CheckpointError(
                    f"{path}: in order, file tensor '{src}' {tuple(tensor.shape)} would go to trunk '{dst}' "
                    f"{tuple(mine.shape)}: not the same architecture (check model.vision.timm_model_name)"
                )
            mapped[dst] = tensor
        sd = mapped
    else:
        sd = {k: v for k, v in sd.items() if k in own or not k.startswith(CLASSIFIER_PREFIXES)}
    from vlp.models.loading import load_state_dict_checked

    load_state_dict_checked(trunk, sd, path, f"timm trunk {type(trunk).__name__}")
    log.info("loaded image trunk weights from %s (%d tensors, match=%s)", path, len(sd), match)


def lock_towers(model: torch.nn.Module, mcfg) -> None:
    """LiT locking: freeze the trunks as configured; fully frozen trunks stay in eval mode."""
    v, t = mcfg.vision, mcfg.text
    if v.lock:
        model.lock_image_tower(unlocked_groups=v.unlocked_groups, freeze_bn_stats=v.freeze_bn_stats)
        if not v.unlocked_groups:
            _mark_frozen(getattr(model.visual, "trunk", model.visual))
    if t.lock:
        model.lock_text_tower(unlocked_layers=t.unlocked_layers, freeze_layer_norm=t.freeze_layer_norm)
        if not t.unlocked_layers:
            text = getattr(model, "text", None)
            _mark_frozen(getattr(text, "transformer", None) or text or model.transformer)


def _mark_frozen(module: torch.nn.Module) -> None:
    module._vlp_frozen = True
    module.eval()


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "_vlp_frozen", False)]


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
