"""Architectures as data: open_clip's model configs plus vlp's own JSON files.

vlp's configs (``vlp/models/configs/*.json``, e.g. the tiny ``debug`` CLIP every test uses) are
registered with open_clip itself, so every model vlp builds is a genuine open_clip module: its
state dict, tokenizer and preprocessing are open_clip's, which is what makes export trivial.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging

import open_clip
import torch
import torch.nn.functional as F

from vlp.checkpoint import architectures

CONFIG_DIR = architectures.VLP_CONFIG_DIR


class UnknownModelError(ValueError):
    pass


def list_models() -> list[str]:
    """All architecture names: open_clip's plus vlp's own."""
    return architectures.names()


def get_model_config(name: str) -> dict:
    """The architecture dict of ``name``; raises UnknownModelError with close matches."""
    cfg = architectures.config_of(name)
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
    """Build an architecture: ``name`` is a registered name or a ``vlp.config.ModelConfig``.
    Returns ``(model, image_mean, image_std)``; see :func:`build` (which also returns the config).
    """
    model, mcfg = build(name, pretrained=pretrained, device=device)
    return model, tuple(mcfg.preprocess.mean), tuple(mcfg.preprocess.std)


def build(name, *, pretrained: str = "", device: str | torch.device = "cpu"):
    """Build an architecture: ``name`` is a registered name or a ``vlp.config.ModelConfig`` (whose
    ``vision`` / ``text`` sections can replace the towers with pretrained timm / Hugging Face ones
    and lock them, see :mod:`vlp.models.towers`). Random init, or the weights ``pretrained`` (or
    ``model.pretrained``) names: an open_clip tag, an ``hf-hub:`` repo, a folder or a checkpoint
    (:mod:`vlp.checkpoint.published`).

    Returns ``(model, mcfg)``: ``model(image, text)`` returns open_clip's output dict with
    normalised features and ``logit_scale`` as the multiplier (exp of the parameter); ``mcfg`` is
    the ModelConfig that rebuilds it (the weights' architecture named, ``preprocess`` filled in:
    size aside, the image preprocessing is ``model.visual.preprocess_cfg``, open_clip's place).

    Raises:
        UnknownModelError: ``name`` is not a registered architecture.
        FileNotFoundError / CheckpointError: the pretrained weights or a tower's are missing, unsafe
            or do not fit (QuickGELU included).
    """
    from vlp.config import ModelConfig
    from vlp.models import towers
    from vlp.models.pretrained import with_pretrained

    mcfg = ModelConfig(name=name) if isinstance(name, str) else name
    if pretrained:
        mcfg = dataclasses.replace(mcfg, pretrained=str(pretrained))
    mcfg, source = with_pretrained(mcfg)
    name = mcfg.name
    if name != "custom":
        get_model_config(name)  # clear error before open_clip's own
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip warns "initialized randomly" on the root logger
    try:
        if towers.needs_custom_build(mcfg):
            model = towers.build_custom(mcfg, device=device)
        else:
            model = open_clip.create_model(
                name, pretrained=None, device=device, output_dict=True, force_quick_gelu=mcfg.force_quick_gelu
            )
    finally:
        root.setLevel(level)
    model = normalized_by_default(model)
    if hasattr(model, "text_decoder"):
        from vlp.models.coca import vlp_coca_forward

        init_multimodal_decoder(model.text_decoder)
        vlp_coca_forward(model)
    if mcfg.itm_head:
        from vlp.models.itm import add_itm_head

        add_itm_head(model)
    if source is not None:
        mcfg = _load_pretrained(model, source, mcfg)
    if mcfg.lora.rank > 0:  # on the loaded base weights, which it then freezes
        from vlp.models.lora import apply_lora

        apply_lora(model, mcfg.lora, where=name)
    apply_model_options(model, mcfg)
    return model, _settle_preprocess(model, mcfg)


def build_loaded(found, *, device: str | torch.device = "cpu"):
    """The model of a resolved checkpoint (:func:`vlp.checkpoint.resolve`), its weights loaded
    strictly after open_clip's fix-ups; LoRA adapters merged into the base weights, so the result
    is the plain model (and ``mcfg`` has ``lora`` off). Returns ``(model, mcfg)`` as :func:`build`."""
    from vlp.checkpoint import load_state_dict_checked
    from vlp.models.pretrained import fit_state_dict

    model, mcfg = build(found.model_cfg, device=device)
    load_state_dict_checked(model, fit_state_dict(model, found.state_dict), found.path, mcfg.name)
    if mcfg.lora.rank:
        from vlp.models.lora import merge_lora, without_lora

        model, mcfg = merge_lora(model), without_lora(mcfg)
    return model, mcfg


def _load_pretrained(model: torch.nn.Module, source, mcfg):
    """Load ``source``'s weights; a checkpoint's saved preprocessing fills what ``mcfg`` leaves empty."""
    from vlp.checkpoint import load_state_dict_checked, resolve
    from vlp.models.pretrained import fit_state_dict, load_source

    if source.kind != "checkpoint":
        load_source(model, source, mcfg.name)
        return mcfg
    found = resolve(source.spec, mcfg.name)
    sd = found.state_dict
    if found.checkpoint is not None:  # a LoRA run's checkpoint starts the next run merged
        from vlp.checkpoint.kinds import architecture_of

        saved = architecture_of(found.checkpoint, found.path)
        if saved.lora.rank:
            sd = build_loaded(dataclasses.replace(found, model_cfg=saved))[0].state_dict()
    load_state_dict_checked(model, fit_state_dict(model, sd), found.path, mcfg.name)
    saved = found.preprocess or {}
    fields = {k: v for k, v in saved.items() if not getattr(mcfg.preprocess, k)}
    return dataclasses.replace(mcfg, preprocess=dataclasses.replace(mcfg.preprocess, **fields)) if fields else mcfg


def _settle_preprocess(model: torch.nn.Module, mcfg):
    """Set ``model.visual.preprocess_cfg`` to the architecture's preprocessing overridden by
    ``mcfg.preprocess``, and return ``mcfg`` with every preprocessing field filled in."""
    from open_clip.transform import PreprocessCfg

    pp = {**dataclasses.asdict(PreprocessCfg()), **(getattr(model.visual, "preprocess_cfg", None) or {})}
    pp["size"] = getattr(model.visual, "image_size", pp["size"])
    for key in ("mean", "std", "interpolation", "resize_mode"):
        if getattr(mcfg.preprocess, key):
            pp[key] = getattr(mcfg.preprocess, key)
    pp["mean"], pp["std"] = tuple(float(x) for x in pp["mean"]), tuple(float(x) for x in pp["std"])
    model.visual.preprocess_cfg = pp
    filled = dataclasses.replace(
        mcfg.preprocess, mean=list(pp["mean"]), std=list(pp["std"]),
        interpolation=pp["interpolation"], resize_mode=pp["resize_mode"],
    )  # fmt: skip
    return dataclasses.replace(mcfg, preprocess=filled)


def preprocess_of(model: torch.nn.Module) -> dict:
    """The model's image preprocessing (open_clip's ``preprocess_cfg``: size, mean, std,
    interpolation, resize_mode, fill_color), as :func:`build` set it."""
    return dict(model.visual.preprocess_cfg)


def eval_preprocess(model: torch.nn.Module):
    """PIL image -> normalised 3xSxS tensor, as the model's weights prescribe (see :func:`preprocess_of`)."""
    from vlp.data.transforms import eval_transform

    pp = preprocess_of(model)
    return eval_transform(
        image_size(model), pp["mean"], pp["std"], interpolation=pp["interpolation"], resize_mode=pp["resize_mode"]
    )


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
