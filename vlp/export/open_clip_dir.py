"""``--format open_clip``: a folder ``open_clip.create_model_and_transforms("local-dir:DIR")`` loads.

``open_clip_config.json`` holds ``{"model_cfg": ..., "preprocess_cfg": ...}`` (the layout of
open_clip's Hugging Face Hub helpers) and ``open_clip_model.safetensors`` the state dict, which is
open_clip's own: vlp's models are open_clip modules. The architecture is written out in full, so
vlp's own names (``debug``) and vlp-built towers (timm trunk, Hugging Face text model) load without
vlp. A Hugging Face text tower's config is still read from the folder or hub id it was built from
(open_clip builds that tower from its name), and its tokenizer is saved into the folder (open_clip
reads a local-dir model's HF tokenizer from there).
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

from vlp.export.safetensors_file import plain_tensors

log = logging.getLogger(__name__)
CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
VLP_ONLY_PREFIXES = ("itm_head.",)  # modules vlp adds to open_clip's (ITM head of CoCa): not loadable there


def open_clip_config(source) -> dict:
    """``{"model_cfg", "preprocess_cfg"}`` for ``source``'s architecture, written out in full."""
    from vlp.models import towers
    from vlp.models.registry import get_model_config

    mcfg = source.model_cfg
    if towers.needs_custom_build(mcfg):
        model_cfg = towers.open_clip_config(mcfg)
        model_cfg.pop("preprocess_cfg", None)
    else:
        model_cfg = copy.deepcopy(get_model_config(mcfg.name))
    preprocess = {"mean": list(source.mean), "std": list(source.std)}
    own = getattr(source.model.visual, "preprocess_cfg", {}) or {}
    preprocess.update({k: own[k] for k in ("interpolation", "resize_mode") if k in own})
    return {"model_cfg": model_cfg, "preprocess_cfg": preprocess}


def left_out(source) -> list[str]:
    """Names of the vlp-only tensors open_clip cannot load (the ITM head of a CoCa model)."""
    return [key for key in source.state_dict if key.startswith(VLP_ONLY_PREFIXES)]


def validate(source) -> None:
    """Every vlp model is an open_clip module; nothing to refuse."""


def write(source, out: Path) -> list[str]:
    """Write the config, the weights and (Hugging Face text towers) the tokenizer; returns file names."""
    from safetensors.torch import save_file

    config = open_clip_config(source)
    dropped = left_out(source)
    if dropped:
        log.warning("open_clip has no module for %s: left out of the export", ", ".join(dropped))
    state = {k: v for k, v in source.state_dict.items() if k not in dropped}
    before = set(p.name for p in out.iterdir())
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    save_file(plain_tensors(state), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    hf_text = config["model_cfg"].get("text_cfg", {}).get("hf_tokenizer_name")
    if hf_text:
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(hf_text).save_pretrained(str(out))
    written = [CONFIG_FILE, WEIGHTS_FILE]
    return written + sorted(p.name for p in out.iterdir() if p.name not in before and p.name not in written)


def load(out: Path):
    """``(model, preprocess, tokenizer)`` as open_clip loads the folder (eval mode)."""
    import open_clip

    from vlp.models.towers import _quiet_transformers

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # open_clip logs every loading step on the root logger
    try:
        with _quiet_transformers():
            model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
            tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    finally:
        root.setLevel(level)
    return model.eval(), preprocess, tokenizer


def check(source, out: Path, batch) -> dict:
    """Load the folder with open_clip alone; max abs differences against the source on ``batch``
    (a :class:`vlp.export.parity.ParityBatch`), tokenizer ids and normalisation compared too."""
    import torch

    from vlp.export.parity import compare, model_features, summarize

    model, preprocess, tokenizer = load(out)
    diffs = compare(batch.reference, model_features(model, batch.pixels_BCSS, batch.text_BL), raw=True)
    normalize = next(t for t in preprocess.transforms if type(t).__name__ == "Normalize")
    same_norm = list(normalize.mean) == list(source.mean) and list(normalize.std) == list(source.std)
    same_ids = bool(torch.equal(tokenizer(list(batch.captions)), batch.text_BL))
    return summarize(diffs, tokenizer_ids_equal=same_ids, preprocess_equal=same_norm)
