"""Architecture names as data: open_clip's model configs plus vlp's own JSON files, and which
registered name a config dict is.

vlp's configs (``vlp/models/configs/*.json``, e.g. the tiny ``debug`` CLIP every test uses) are
registered with open_clip itself, so that every name resolves the same way everywhere. The
register lives here, below the models, because reading a checkpoint already needs it: weights that
carry their own architecture (a Hugging Face CLIP folder, an ``hf-hub:`` repo, an open_clip folder)
are named by the registered architecture their config equals (:func:`matching_name`).
"""

from __future__ import annotations

import copy
from functools import lru_cache
from pathlib import Path

import open_clip

VLP_CONFIG_DIR = Path(__file__).resolve().parent.parent / "models" / "configs"

# the options of a plain open_clip ViT / text transformer, with open_clip's defaults: two configs
# that agree on these (after defaults are filled in) build the same network
_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0, "ls_init_value": None, "patch_dropout": 0.0}
_TEXT_DEFAULTS = {"heads": 8, "mlp_ratio": 4.0, "ls_init_value": None}
_TOP_DEFAULTS = {"quick_gelu": False, "init_logit_bias": None}


@lru_cache(maxsize=1)
def register() -> None:
    """Add vlp's config folder to open_clip's registry (once per process)."""
    open_clip.add_model_config(VLP_CONFIG_DIR)


def names() -> list[str]:
    register()
    return sorted(open_clip.list_models())


def config_of(name: str) -> dict | None:
    """The architecture dict of a registered name (or an ``hf-hub:`` / ``local-dir:`` one); None if unknown."""
    register()
    return open_clip.get_model_config(name)


def _normalised(cfg: dict) -> dict:
    cfg = copy.deepcopy(cfg)
    out = {**_TOP_DEFAULTS, **{k: v for k, v in cfg.items() if k not in ("vision_cfg", "text_cfg")}}
    out["vision_cfg"] = {**_VISION_DEFAULTS, **cfg.get("vision_cfg", {})}
    out["text_cfg"] = {**_TEXT_DEFAULTS, **cfg.get("text_cfg", {})}
    for section in (out["vision_cfg"], out["text_cfg"]):
        for key, value in list(section.items()):
            if isinstance(value, (list, tuple)):
                section[key] = list(value)
    if "custom_text" in out:  # CLIP vs CustomTextCLIP: the same network, other state-dict keys
        out["custom_text"] = bool(out["custom_text"])
    return out


def same_architecture(a: dict, b: dict) -> bool:
    """Whether two open_clip architecture dicts build the same network with the same state-dict keys."""
    return _normalised(a) == _normalised(b)


def differences(a: dict, b: dict) -> list[str]:
    """``key: a vs b`` for each option on which two architecture dicts differ (dotted keys)."""
    na, nb = _normalised(a), _normalised(b)
    out = []
    for key in sorted(set(na) | set(nb)):
        va, vb = na.get(key), nb.get(key)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += [
                f"{key}.{k}: {va.get(k)} vs {vb.get(k)}" for k in sorted(set(va) | set(vb)) if va.get(k) != vb.get(k)
            ]
        elif va != vb:
            out.append(f"{key}: {va} vs {vb}")
    return out


def matching_name(cfg: dict, prefer: str = "") -> str | None:
    """The registered architecture whose config builds the same network as ``cfg``: ``prefer``
    when it does, else the first in sorted order (None when none does)."""
    candidates = ([prefer] if prefer else []) + names()
    for name in candidates:
        own = config_of(name)
        if own is not None and same_architecture(own, cfg):
            return name
    return None
