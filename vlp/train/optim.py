"""AdamW with no weight decay on gains, biases and the logit scale; warm-up + cosine schedule."""

from __future__ import annotations

import math

import torch


def _no_decay(name: str, p: torch.nn.Parameter) -> bool:
    return p.ndim < 2 or "logit_scale" in name or "logit_bias" in name or name.endswith(".bias")


def build_optimizer(model: torch.nn.Module, train_cfg) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if _no_decay(name, p) else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": train_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    fused = _fused_supported(next(model.parameters()).device)
    return torch.optim.AdamW(
        groups,
        lr=train_cfg.lr,
        betas=tuple(train_cfg.betas),
        eps=train_cfg.eps,
        fused=True if fused else None,
        foreach=None if fused else True,
    )


def _fused_supported(device: torch.device) -> bool:
    """Whether torch has a fused AdamW kernel for ``device`` (CUDA; CPU from torch 2.4).

    The fused kernel updates each parameter in one pass and keeps the step count on the device
    (no host sync); on CPU it measured 7x faster than ``foreach`` for ViT-B-32's 151M parameters
    (0.19 s against 1.45 s a step, one thread; docs/performance.md).
    """
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices
    except ImportError:  # older torch: CUDA only
        return device.type == "cuda"
    return device.type in _get_fused_kernels_supported_devices()


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over ``warmup`` steps, then cosine decay to ``min_ratio`` at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def build_scheduler(optimizer, train_cfg, total_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total_steps, train_cfg.warmup_steps, train_cfg.min_lr_ratio)
    )
