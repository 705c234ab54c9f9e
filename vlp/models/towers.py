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

import contextlib
import copy
import importlib.util
import logging
from pathlib import Path

import torch

from vlp.checkpoint import CheckpointError, extract_state_dict, read_file

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
    if mcfg.force_quick_gelu:
        cfg["quick_gelu"] = True
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
        path = hf_location(t.hf_model_name_or_path)
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


def hf_location(spec: str) -> str:
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
    # a CoCa (a multimodal decoder over the towers) is built as one; CLIPs as their text tower says
    coca = "multimodal_cfg" in cfg
    cls = open_clip.CoCa if coca else open_clip.CustomTextCLIP if custom_text else open_clip.CLIP
    with _quiet_transformers():
        model = cls(**cfg) if coca else cls(**cfg, output_dict=True)  # a CoCa always returns a dict
    model.visual.preprocess_cfg = {**(getattr(model.visual, "preprocess_cfg", {}) or {}), **preprocess}
    if mcfg.vision.weights:
        load_trunk_weights(model.visual, mcfg.vision.weights, mcfg.vision.weights_match)
    if hasattr(model.visual, "trunk"):
        # convolutional trunks run about twice as fast channels-last on CPU (and use tensor cores on GPU)
        model.visual.trunk.to(memory_format=torch.channels_last)
    lock_towers(model, mcfg)
    return model.to(device)


@contextlib.contextmanager
def _quiet_transformers():
    """transformers prints a load report and a progress bar for every model it reads; a sentence
    model's unused pooler head shows up there as "UNEXPECTED" keys, which is expected here (the
    pooling is configured in ``model.text.pooler``). Real errors still raise."""
    if importlib.util.find_spec("transformers") is None:
        yield
        return
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


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
    from vlp.checkpoint import load_state_dict_checked

    load_state_dict_checked(trunk, sd, path, f"timm trunk {type(trunk).__name__}")
    log.info("loaded image trunk weights from %s (%d tensors, match=%s)", path, len(sd), match)


def lock_towers(model: torch.nn.Module, mcfg) -> None:
    """LiT locking: freeze the trunks as configured; fully frozen trunks stay in eval mode."""
    v, t = mcfg.vision, mcfg.text
    if v.lock:
        if hasattr(model.visual, "trunk"):
            lock_timm_trunk(model.visual.trunk, v.unlocked_groups, v.freeze_bn_stats)
        else:  # what CLIP's lock_image_tower does; a CoCa has no such method but the same tower
            model.visual.lock(unlocked_groups=v.unlocked_groups, freeze_bn_stats=v.freeze_bn_stats)
        if not v.unlocked_groups:
            _mark_frozen(getattr(model.visual, "trunk", model.visual))
    if t.lock:
        if hasattr(getattr(model, "text", None), "transformer"):
            lock_hf_text(model.text.transformer, t.unlocked_layers, t.freeze_layer_norm)
        elif hasattr(model, "lock_text_tower"):
            model.lock_text_tower(unlocked_layers=t.unlocked_layers, freeze_layer_norm=t.freeze_layer_norm)
        else:  # a CoCa: its text tower locks itself
            model.text.lock(t.unlocked_layers, t.freeze_layer_norm)
        if not t.unlocked_layers:
            text = getattr(model, "text", None)
            _mark_frozen(getattr(text, "transformer", None) or text or model.transformer)


def lock_timm_trunk(trunk: torch.nn.Module, unlocked_groups: int = 0, freeze_bn_stats: bool = True) -> None:
    """Freeze a timm trunk but its last ``unlocked_groups`` layer groups (timm's group matcher).

    Not open_clip's ``TimmModel.lock``: its batch-norm freezing turns timm's ``BatchNormAct2d``
    (batch norm + activation in one module, as in EfficientNet) into a plain ``FrozenBatchNorm2d``
    and so silently deletes the activations; timm's own ``freeze_batch_norm_2d`` keeps them. A fully
    locked trunk keeps its modules (and state-dict keys) as they are: it runs in eval mode, so its
    statistics never move. Raises ValueError when the trunk has no more than ``unlocked_groups`` groups.
    """
    if not unlocked_groups:
        trunk.requires_grad_(False)
        return
    from timm.layers import freeze_batch_norm_2d
    from timm.models import group_modules, group_parameters

    matcher = trunk.group_matcher()
    groups = group_parameters(trunk, matcher)
    last_locked = max(groups) - unlocked_groups
    if last_locked < 0:
        raise ValueError(
            f"model.vision.unlocked_groups={unlocked_groups}: the {type(trunk).__name__} trunk has only "
            f"{max(groups) + 1} layer groups (use model.vision.lock=false to train all of it)"
        )
    for gid in range(last_locked + 1):
        for name in groups.get(gid, []):
            trunk.get_parameter(name).requires_grad_(False)
    if freeze_bn_stats:
        locked = [name for name, gid in group_modules(trunk, matcher, reverse=True).items() if gid <= last_locked]
        for name in locked:
            module = trunk.get_submodule(name)
            frozen = freeze_batch_norm_2d(module)
            if frozen is not module:
                parent, _, child = name.rpartition(".")
                trunk.get_submodule(parent).add_module(child, frozen)


def _layer_list(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    """The stack of transformer layers: the ModuleList holding the most parameters
    (``encoder.layer`` of BERT, ``layers`` of many decoders, ``h`` of GPT-2, ...)."""
    lists = [m for m in transformer.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if not lists:
        raise ValueError(f"model.text.unlocked_layers: no layer list found in {type(transformer).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


def lock_hf_text(transformer: torch.nn.Module, unlocked_layers: int = 0, freeze_layer_norm: bool = True) -> None:
    """Freeze a Hugging Face text transformer but its last ``unlocked_layers`` layers and what comes
    after them (final norm, pooler). LayerNorms of the frozen part stay trainable when
    ``freeze_layer_norm`` is false. open_clip's ``HFTextEncoder.lock`` fails for partial unlocking of
    BERT-family models (its architecture table has no layer attribute for them), hence this."""
    names = [n for n, _ in transformer.named_parameters()]
    first_open = len(names)
    if unlocked_layers:
        layers = _layer_list(transformer)
        if unlocked_layers > len(layers):
            raise ValueError(
                f"model.text.unlocked_layers={unlocked_layers}: {type(transformer).__name__} has only "
                f"{len(layers)} layers (use model.text.lock=false to train all of it)"
            )
        first = next(layers[len(layers) - unlocked_layers].parameters())
        first_open = next(i for i, (_, p) in enumerate(transformer.named_parameters()) if p is first)
    for i, (name, param) in enumerate(transformer.named_parameters()):
        is_norm = any(part.lower() in ("layernorm", "layer_norm", "ln", "norm") for part in name.split("."))
        param.requires_grad_(i >= first_open or (is_norm and not freeze_layer_norm))


def _mark_frozen(module: torch.nn.Module) -> None:
    module._vlp_frozen = True
    module.eval()


def frozen_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if getattr(m, "_vlp_frozen", False)]


def trainable_count(model: torch.nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    total = sum(p.numel() for p in model.parameters())
    return sum(p.numel() for p in model.parameters() if p.requires_grad), total
