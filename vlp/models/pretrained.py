"""Published weights meet the architecture: which architecture ``model.pretrained`` implies, the
QuickGELU check, the preprocessing the weights bring, and open_clip's state-dict fix-ups.

:func:`with_pretrained` turns a ``ModelConfig`` into the one that rebuilds the same model later
(the architecture named, ``model.preprocess`` filled in), so that the config saved in every
checkpoint and export carries the preprocessing even after ``model.pretrained`` is dropped.
"""

from __future__ import annotations

import contextlib
import dataclasses

import torch

from vlp.checkpoint import architectures
from vlp.checkpoint.files import CheckpointError, load_state_dict_checked
from vlp.checkpoint.published import Source, describe
from vlp.config import ModelConfig

DEFAULT_NAME = ModelConfig().name
QUICKGELU_SUFFIX = "-quickgelu"


def with_pretrained(mcfg: ModelConfig) -> tuple[ModelConfig, Source | None]:
    """``(mcfg with the pretrained weights' architecture and preprocessing, the weights' Source)``;
    ``mcfg`` unchanged and None without ``pretrained``.

    Raises:
        CheckpointError: an unknown tag, an architecture that does not fit the weights (the message
            names the one that does), or QuickGELU weights on an architecture without it (or the reverse).
    """
    if not mcfg.pretrained:
        return mcfg, None
    custom = mcfg.name == "custom"
    src = describe(mcfg.pretrained, None if custom else mcfg.name)
    name = mcfg.name
    if src.arch and src.arch != name:
        if name != DEFAULT_NAME:  # the default name means "not given": the weights' architecture is taken
            raise CheckpointError(_mismatch(mcfg.pretrained, name, src.arch))
        name = src.arch
    if src.quick_gelu is not None and not custom:
        _check_quick_gelu(name, mcfg.force_quick_gelu, src)
    fields = {}
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if not getattr(mcfg.preprocess, key) and key in src.preprocess:
            value = src.preprocess[key]
            fields[key] = [float(x) for x in value] if key in ("mean", "std") else value
    preprocess = dataclasses.replace(mcfg.preprocess, **fields)
    return dataclasses.replace(mcfg, name=name, preprocess=preprocess), src


def _mismatch(spec: str, name: str, arch: str) -> str:
    own, theirs = architectures.config_of(name), architectures.config_of(arch)
    diff = "; ".join(architectures.differences(own or {}, theirs or {})[:4])
    return (
        f"model.name {name} is not the architecture of pretrained '{spec}' ({arch}; they differ in {diff}): "
        f"set model.name: {arch} (or --model {arch}), or leave it out"
    )


def _check_quick_gelu(name: str, forced: bool, src: Source) -> None:
    cfg = architectures.config_of(name) or {}
    built_with = bool(cfg.get("quick_gelu", False)) or forced
    if built_with == src.quick_gelu:
        return
    what = f"pretrained '{src.spec}' of {name}" if src.kind == "open_clip tag" else f"pretrained '{src.spec}'"
    if src.quick_gelu:
        other = name + QUICKGELU_SUFFIX
        fix = (
            f"use model.name {other} (--model {other})"
            if architectures.config_of(other) is not None
            else "set model.force_quick_gelu: true"
        )
        raise CheckpointError(f"{what} was trained with QuickGELU but {name} uses GELU: {fix}")
    base = name.removesuffix(QUICKGELU_SUFFIX)
    fix = f"use model.name {base} (--model {base})" if base != name else "set model.force_quick_gelu: false"
    raise CheckpointError(f"{what} was trained with GELU but {name} uses QuickGELU: {fix}")


def fit_state_dict(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """open_clip's fix-ups of published state dicts before a strict load: the old text-tower key
    layout for ``CustomTextCLIP``, 1-element vs 0-d logit scale / bias, a missing SigLIP logit
    bias, stale ``position_ids``, and position embeddings resized to the model's grid / context."""
    from open_clip.model import convert_to_custom_text_state_dict, resize_pos_embed, resize_text_pos_embed

    sd = dict(sd)
    if "positional_embedding" in sd and not hasattr(model, "positional_embedding"):
        sd = convert_to_custom_text_state_dict(sd)
    for key in ("logit_scale", "logit_bias"):
        own = getattr(model, key, None)
        if key in sd and isinstance(own, torch.Tensor) and own.ndim != sd[key].ndim:
            sd[key] = sd[key].reshape(own.shape)
    if "logit_bias" not in sd and getattr(model, "logit_bias", None) is not None and "logit_scale" in sd:
        sd["logit_bias"] = torch.zeros_like(sd["logit_scale"])
    position_ids = "text.transformer.embeddings.position_ids"  # gone from transformers' BERT-likes since 4.31
    if position_ids in sd and position_ids not in model.state_dict():
        del sd[position_ids]
    for resize in (resize_pos_embed, resize_text_pos_embed):
        # another grid or context of the same width; any other difference is the strict load's to report
        with contextlib.suppress(AssertionError, RuntimeError, ValueError):
            resize(sd, model)
    return sd


def load_source(model: torch.nn.Module, src: Source, name: str) -> None:
    """Read ``src``'s weights and load them strictly into ``model`` (after :func:`fit_state_dict`)."""
    load_state_dict_checked(model, fit_state_dict(model, src.read()), src.where or src.spec, name)


def describe_preprocess(pp: dict) -> str:
    """One line: ``224 px, mean (...), std (...), bicubic resize of the shortest side``."""
    size = pp.get("size", "?")
    size = size[0] if isinstance(size, (tuple, list)) else size
    mean, std = (", ".join(f"{float(x):.4g}" for x in pp.get(k, ())) for k in ("mean", "std"))
    mode, interpolation = pp.get("resize_mode", "shortest"), pp.get("interpolation", "bicubic")
    resize = "squash to a square" if mode == "squash" else f"resize of the {mode} side"
    return f"{size} px, mean ({mean}), std ({std}), {interpolation} {resize}"


def describe_weights(mcfg: ModelConfig) -> str:
    """``ViT-B-32-quickgelu from pretrained 'openai'`` / ``debug, random init``."""
    return f"{mcfg.name} from pretrained '{mcfg.pretrained}'" if mcfg.pretrained else f"{mcfg.name}, random init"
