"""The DeepSpeed JSON of a run, generated from vlp's config: one source of truth.

vlp writes the keys that its own config already decides (micro-batch, accumulation, clipping,
precision, ZeRO stage). ``train.deepspeed.config`` may add DeepSpeed's tuning keys (bucket sizes,
communication overlap, offload, ...); a key that contradicts vlp's value is an error naming both, and
``"auto"`` means "vlp's value". The optimizer and the schedule are vlp's (``train.lr`` etc.): a user JSON
with an ``optimizer`` or ``scheduler`` section is refused instead of silently overriding them.

Library code: imports without DeepSpeed.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlp.config import Config, ConfigError

# where each generated key comes from in vlp's config (for the conflict message)
_SOURCE = {
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "train.accum_steps",
    "train_batch_size": "data.batch_size x world size x train.accum_steps",
    "gradient_clipping": "train.grad_clip",
    "zero_optimization.stage": "train.deepspeed.zero_stage",
    "bf16.enabled": "model.precision",
    "fp16.enabled": "model.precision",
}
_REFUSED = {
    "optimizer": "vlp builds AdamW from train.lr / train.weight_decay / train.betas / train.eps",
    "scheduler": "vlp's warm-up + cosine schedule comes from train.warmup_steps / train.min_lr_ratio",
}


def generated_config(cfg: Config, world: int) -> dict:
    """The DeepSpeed JSON that vlp's config implies, before any user JSON."""
    t, p = cfg.train, cfg.model.precision
    return {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": t.accum_steps,
        "train_batch_size": cfg.data.batch_size * world * t.accum_steps,
        "gradient_clipping": float(t.grad_clip),
        "zero_optimization": {"stage": t.deepspeed.zero_stage},
        "bf16": {"enabled": p == "bf16"},
        # dynamic loss scaling (loss_scale 0), as torch's GradScaler does in the DDP path
        "fp16": {"enabled": p == "fp16", "loss_scale": 0, "initial_scale_power": 16},
        # vlp's AdamW (with its weight-decay groups) is the client optimizer
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # vlp logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _merge(base: dict, update: dict) -> dict:
    out = dict(base)
    for k, v in update.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _drop_auto(d: dict) -> dict:
    return {k: _drop_auto(v) if isinstance(v, dict) else v for k, v in d.items() if v != "auto"}


def read_user_config(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"train.deepspeed.config: file not found: {path}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"train.deepspeed.config: {path} is not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"train.deepspeed.config: {path} must hold a JSON object")
    return data


def build_config(cfg: Config, world: int) -> dict:
    """vlp's generated config, with ``train.deepspeed.config`` merged in after the conflict check."""
    ours = generated_config(cfg, world)
    if not cfg.train.deepspeed.config:
        return ours
    path = cfg.train.deepspeed.config
    user = read_user_config(path)
    for key, why in _REFUSED.items():
        if key in user:
            raise ConfigError(f"{path}: remove the '{key}' section: {why}")
    flat_ours, flat_user = _flatten(ours), _flatten(user)
    for key, source in _SOURCE.items():
        if key in flat_user and flat_user[key] != "auto" and flat_user[key] != flat_ours[key]:
            raise ConfigError(
                f"{path}: '{key}' = {flat_user[key]!r} contradicts vlp's config ({source} gives "
                f'{flat_ours[key]!r}); set it in the vlp config instead, or write "auto"'
            )
    return _merge(ours, _drop_auto(user))
