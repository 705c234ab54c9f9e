"""LoRA (low-rank adapters, Hu et al. 2021) on a built model, with Hugging Face ``peft``.

``model.lora.rank > 0`` makes :func:`vlp.models.registry.build_model` call :func:`apply_lora` once
the base weights are in place (``model.pretrained``). peft's ``inject_adapter_in_model`` replaces
each targeted layer in place by a LoRA layer holding the original as ``base_layer``: the model stays
the same open_clip module (its class, ``forward``, ``encode_image`` / ``encode_text``), and its state
dict has the original keys with ``.base_layer`` inserted in the adapted layers' names plus the
adapters' ``lora_A`` / ``lora_B`` weights. Every base weight is frozen; the adapters and (by
default) the logit scale train. :func:`merge_lora` folds the adapters into the base weights and gives
back the plain open_clip model (the state dict has exactly the original keys again): ``vlp export``
and ``vlp.load_model`` return it.

``nn.MultiheadAttention`` (open_clip's attention) keeps its q/k/v projection as a raw parameter and
never calls its ``out_proj`` module, so peft adapts both by adding the low-rank update to the
weights for the forward. peft 0.21 does it by merging before and unmerging after every call, which
leaves ``(W + BA) - BA`` in the frozen weight: rounding that moved the "frozen" weights a little at
every step (measured: 7e-8 after 20 steps) and replaced their Parameter objects at each call.
:class:`_Attention` passes the adapted weights to the attention instead (``torch.func.functional_call``),
so the base weights are never written.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from vlp.config import ConfigError

ADAPTER = "default"  # peft's adapter name: the state-dict keys say ``lora_A.default.weight``
_TRAINABLE_SCALARS = ("logit_scale", "logit_bias")

_attention_class = None


def _attention():
    """The LoRA layer class for ``nn.MultiheadAttention`` (defined on first use: peft imports in ~4 s)."""
    global _attention_class
    if _attention_class is not None:
        return _attention_class
    from peft.tuners.lora.layer import MultiheadAttention

    class _Attention(MultiheadAttention):
        """peft's attention LoRA layer whose forward passes the adapted weights instead of merging."""

        def forward(self, query: torch.Tensor, *args, **kwargs):
            adapters = [a for a in self.active_adapters if a in self.lora_A]
            if self.disable_adapters or self.merged or not adapters:
                return super().forward(query, *args, **kwargs)
            self._check_forward_args(query, *args, **kwargs)
            base = self.get_base_layer()
            w_in, w_out = _adapted_weights(self, adapters)
            weights = {"in_proj_weight": w_in, "out_proj.base_layer.weight": w_out}
            out, attn = torch.func.functional_call(base, weights, (query, *args), kwargs, strict=False)
            return out.to(query.dtype), (attn.to(query.dtype) if attn is not None else None)

        def _restore_weights(self):
            # peft re-registers (as new Parameter objects, on every state_dict / named_modules call) the
            # weights its own merge() displaced; this forward never displaces them
            base = self.get_base_layer()
            if "in_proj_weight" in base._parameters and "weight" in base.out_proj.get_base_layer()._parameters:
                return
            super()._restore_weights()

    _attention_class = _Attention
    return _attention_class


def _adapted_weights(layer, adapters) -> tuple[torch.Tensor, torch.Tensor]:
    """``W + scale * B A`` of an attention LoRA layer's q/k/v and output projections."""
    base = layer.get_base_layer()
    out_proj = base.out_proj  # peft's Linear around the attention's own
    w_in, w_out = base.in_proj_weight, out_proj.get_base_layer().weight
    for a in adapters:
        w_in = w_in + layer.get_delta_weight(a).to(w_in.dtype)
        w_out = w_out + out_proj.get_delta_weight(a).to(w_out.dtype)
    return w_in, w_out


def _candidates(model: nn.Module) -> tuple[dict[str, nn.Module], set[str]]:
    """Layers LoRA can adapt, by full name: linear layers and attentions, but not the ``out_proj``
    inside an attention (its forward is never called; the attention's adapter covers it), and the
    names of those ``out_proj`` layers."""
    found = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.MultiheadAttention))}
    inner = {f"{n}.out_proj" for n, m in found.items() if isinstance(m, nn.MultiheadAttention)}
    return {n: m for n, m in found.items() if n not in inner}, inner


def target_layers(model: nn.Module, targets: list[str], where: str = "the model") -> list[str]:
    """Full names of the layers ``targets`` name (a name or a dotted suffix of one, as peft matches).

    Raises ConfigError naming ``model.lora.targets`` for a target that matches no linear or
    attention layer, or only an attention's ``out_proj``.
    """
    layers, inner = _candidates(model)
    names: list[str] = []
    for t in (t.strip() for t in targets):
        hits = [n for n in layers if n == t or n.endswith("." + t)]
        if not hits:
            key = f"config key 'model.lora.targets' = {list(targets)!r}"
            if any(n == t or n.endswith("." + t) for n in inner):
                raise ConfigError(
                    f"{key}: '{t}' is the output projection of nn.MultiheadAttention, whose forward never calls "
                    "it (its adapter would do nothing); target the attention itself (e.g. 'attn'), which adapts "
                    "its q/k/v and output projections together"
                )
            leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
            raise ConfigError(
                f"{key}: '{t}' matches no linear or attention layer of {where}; its layer names: {', '.join(leaves)}"
            )
        names += [n for n in hits if n not in names]
    return names


def apply_lora(model: nn.Module, lcfg, where: str = "the model") -> nn.Module:
    """Put rank-``lcfg.rank`` adapters on the layers ``lcfg.targets`` name (in place) and freeze
    every other weight but the logit scale / bias (if ``lcfg.train_logit_scale``). Returns ``model``.

    The adapters start as peft initialises them: A random (Kaiming), B zero, so until the first step
    the adapted model computes what the base model does (to float rounding).
    """
    import peft

    names = target_layers(model, lcfg.targets, where)
    config = peft.LoraConfig(
        r=lcfg.rank,
        lora_alpha=lcfg.alpha,
        lora_dropout=lcfg.dropout,
        target_modules=names,  # full names: exactly the layers checked above
        bias="none",
    )
    config._register_custom_module({nn.MultiheadAttention: _attention()})
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    for name, p in model.named_parameters():
        p.requires_grad_(_trains(name, lcfg.train_logit_scale))
    return model


def _trains(name: str, logit_scale: bool) -> bool:
    return ".lora_A." in name or ".lora_B." in name or (logit_scale and name in _TRAINABLE_SCALARS)


def without_lora(mcfg):
    """``mcfg`` (a ModelConfig) describing the merged, plain model: ``model.lora`` at its defaults (off)."""
    return dataclasses.replace(mcfg, lora=type(mcfg.lora)())


def has_lora(model: nn.Module) -> bool:
    """Whether ``model`` carries LoRA adapters (no peft import)."""
    return any(hasattr(m, "lora_A") for m in model.modules())


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The outermost LoRA layers (an attention's wrapped ``out_proj`` is part of the attention's)."""
    layers: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if hasattr(module, "lora_A") and not any(name.startswith(outer + ".") for outer, _ in layers):
            layers.append((name, module))
    return layers


def lora_summary(model: nn.Module) -> tuple[int, int, int]:
    """``(adapted layers, trainable parameters, all parameters)``."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return len(_lora_layers(model)), trainable, total


def describe(model: nn.Module, rank: int) -> str:
    """The start-up line: ``LoRA rank 8 on 72 layers: 1,234 trainable of 5,678 parameters (0.02%)``."""
    layers, trainable, total = lora_summary(model)
    share = 100 * trainable / max(total, 1)
    return f"LoRA rank {rank} on {layers} layers: {trainable:,} trainable of {total:,} parameters ({share:.2f}%)"


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight and put the base layers back (in place): a plain
    open_clip model whose state dict has exactly the keys of one built without LoRA, every
    parameter trainable again as in a fresh build. Returns ``model`` (unchanged without adapters).

    Linear layers merge with peft's own ``merge(safe_merge=True)`` (W + scale * B A, checked for
    NaNs); attentions with the expression their forward uses (:func:`_adapted_weights`), written
    into the same Parameter objects.
    """
    layers = _lora_layers(model)
    for name, layer in layers:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        adapters = [a for a in layer.active_adapters if a in layer.lora_A]
        if isinstance(layer.get_base_layer(), nn.MultiheadAttention):
            base = layer.get_base_layer()
            w_in, w_out = _adapted_weights(layer, adapters)
            out_proj = base.out_proj.get_base_layer()
            base.in_proj_weight.data = w_in.detach()
            out_proj.weight.data = w_out.detach()
            base.out_proj = out_proj
        else:
            layer.merge(safe_merge=True, adapter_names=adapters)
            base = layer.get_base_layer()
        setattr(parent, child, base)
    if layers:
        if hasattr(model, "peft_config"):
            del model.peft_config
        for p in model.parameters():
            p.requires_grad_(True)
    return model
