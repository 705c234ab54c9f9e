"""Architectures as data: open_clip's model configs plus vlp's own JSON files.

vlp's configs (``vlp/models/configs/*.json``, e.g. the tiny ``debug`` CLIP every test uses) are
registered with open_clip itself, so every model vlp builds is a genuine open_clip module: its
state dict, tokenizer and preprocessing are open_clip's, which is what makes export trivial.
"""

from __future__ import annotations

import difflib
import logging
from functools import lru_cache
from pathlib import Path

import open_clip
import torch
import torch.nn.functional as F

CONFIG_DIR = Path(__file__).parent / "configs"


class UnknownModelError(ValueError):
    pass


@lru_cache(maxsize=1)
def _register_vlp_configs() -> None:
    open_clip.add_model_config(CONFIG_DIR)


def list_models() -> list[str]:
    """All architecture names: open_clip's plus vlp's own."""
    _register_vlp_configs()
    return sorted(open_clip.list_models())


def get_model_config(name: str) -> dict:
    """The architecture dict of ``name``; raises UnknownModelError with close matches."""
    _register_vlp_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        close = difflib.get_close_matches(name, open_clip.list_models(), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(
            f"unknown model '{name}'.{hint} See vlp.models.list_models() (vlp's own: "
            f"{', '.join(p.stem for p in sorted(CONFIG_DIR.glob('*.json')))})."
        )
    return cfg


class _NormalizedFeatures:
    """Mixin: ``encode_image`` / ``encode_text`` return L2-normalised features by default.

    open_clip's default is unnormalised; vlp's public contract is normalised. The class is
    swapped on the instance (see :func:`normalized_by_default`) so that the module tree and the
    state dict stay exactly open_clip's.
    """

    def encode_image(self, image, normalize: bool = True):
        return super().encode_image(image, normalize=normalize)

    def encode_text(self, text, normalize: bool = True):
        return super().encode_text(text, normalize=normalize)

    def train(self, mode: bool = True):
        # a fully locked (LiT) trunk stays in eval mode: no dropout, no batch-norm updates
        super().train(mode)
        for module in self.modules():
            if getattr(module, "_vlp_frozen", False):
                module.eval()
        return self


_NORMALIZED_CLASSES: dict[type, type] = {}


def normalized_by_default(model: torch.nn.Module) -> torch.nn.Module:
    base = type(model)
    if issubclass(base, _NormalizedFeatures):
        return model
    if base not in _NORMALIZED_CLASSES:
        _NORMALIZED_CLASSES[base] = type(base.__name__, (_NormalizedFeatures, base), {})
    model.__class__ = _NORMALIZED_CLASSES[base]
    return model


def build_model(name, *, pretrained: str = "", device: str | torch.device = "cpu"):
    """Build an architecture: ``name`` is a registered name or a ``vlp.config.ModelConfig`` (whose
    ``vision`` / ``text`` sections can replace the towers with pretrained timm / Hugging Face ones
    and lock them, see :mod:`vlp.models.towers`). Random init, or weights from a local checkpoint.

    Returns ``(model, image_mean, image_std)``; ``model(image, text)`` returns open_clip's output
    dict with normalised features and ``logit_scale`` as the multiplier (exp of the parameter).

    Raises:
        UnknownModelError: ``name`` is not a registered architecture.
        FileNotFoundError / CheckpointError: ``pretrained`` or a tower's weights are missing or do not fit.
    """
    from vlp.models import towers

    mcfg = None if isinstance(name, str) else name
    if mcfg is not None:
        name, pretrained = mcfg.name, pretrained or mcfg.pretrained
    if mcfg is None or mcfg.name != "custom":
        get_model_config(name)  # clear error before open_clip's own
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly" on the root logger
    try:
        if mcfg is not None and towers.needs_custom_build(mcfg):
            model = towers.build_custom(mcfg, device=device)
        else:
            model = open_clip.create_model(name, pretrained=None, device=device, output_dict=True)
    finally:
        root.setLevel(level)
    model = normalized_by_default(model)
    if hasattr(model, "text_decoder"):
        from vlp.models.coca import vlp_coca_forward

        init_multimodal_decoder(model.text_decoder)
        vlp_coca_forward(model)
    if mcfg is not None and mcfg.itm_head:
        from vlp.models.itm import add_itm_head

        add_itm_head(model)
    if pretrained:
        from vlp.checkpoint import load_weights

        load_weights(model, pretrained, model_name=name)
    apply_model_options(model, mcfg)
    pp = getattr(model.visual, "preprocess_cfg", {}) or {}
    mean = tuple(pp.get("mean", open_clip.OPENAI_DATASET_MEAN))
    std = tuple(pp.get("std", open_clip.OPENAI_DATASET_STD))
    return model, mean, std


def apply_model_options(model: torch.nn.Module, mcfg=None) -> None:
    """The training options of a ``ModelConfig``: ``patch_dropout``, ``grad_checkpointing``,
    ``channels_last``. Without a config (a build by name) only the architecture's own patch
    dropout, if any, is swapped for vlp's sync-free one (:mod:`vlp.models.patch_dropout`).

    Raises:
        ValueError: patch dropout on an image tower that is not an open_clip ViT, or gradient
            checkpointing on a model without ``set_grad_checkpointing``.
    """
    from vlp.models.patch_dropout import set_patch_dropout

    set_patch_dropout(model, getattr(mcfg, "patch_dropout", 0.0))
    if mcfg is None:
        return
    if mcfg.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise ValueError(f"model.grad_checkpointing: {type(model).__name__} has no set_grad_checkpointing")
        model.set_grad_checkpointing(True)
    if mcfg.channels_last:
        model.to(memory_format=torch.channels_last)  # convolution weights only: 4-d tensors


def init_multimodal_decoder(decoder: torch.nn.Module) -> None:
    """CLIP's initialisation for a CoCa multimodal decoder, as open_clip intends it.

    open_clip 3.3's ``MultimodalTransformer`` never calls its ``init_parameters`` (which would fail:
    it reads ``self.transformer.width`` of a module that is itself the transformer), so its output
    projection to the vocabulary stays ``torch.empty``: whatever was in memory, different from run
    to run and sometimes huge (caption losses of 1e30 were seen here). vlp initialises it and the
    attention and MLP weights of both block stacks with CLIP's standard deviations.
    """
    width, layers = decoder.width, decoder.layers
    proj_std, attn_std, fc_std = (width**-0.5) * ((2 * layers) ** -0.5), width**-0.5, (2 * width) ** -0.5
    with torch.no_grad():
        for block in [*decoder.resblocks, *decoder.cross_attn]:
            torch.nn.init.normal_(block.attn.in_proj_weight, std=attn_std)
            torch.nn.init.normal_(block.attn.out_proj.weight, std=proj_std)
            torch.nn.init.normal_(block.mlp.c_fc.weight, std=fc_std)
            torch.nn.init.normal_(block.mlp.c_proj.weight, std=proj_std)
        if decoder.text_projection is not None:
            torch.nn.init.normal_(decoder.text_projection, std=width**-0.5)


def image_size(model: torch.nn.Module) -> int:
    size = model.visual.image_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


def context_length(model: torch.nn.Module) -> int:
    return int(getattr(model, "context_length", 77))


def normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)
