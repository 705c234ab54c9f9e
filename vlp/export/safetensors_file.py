"""``--format safetensors``: ``model.safetensors``, vlp's plain state dict with its architecture.

The metadata (string -> string, safetensors' only kind) holds ``vlp_format``, ``vlp_version``,
``architecture`` and ``model_config``: the JSON of the vlp ``ModelConfig`` that rebuilds the
model (tower weight files already set aside: every weight is in the file). ``format: pt`` is the
tag other tools (transformers, timm) expect of a PyTorch safetensors file. Reading it never
unpickles anything.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from vlp._version import __version__
from vlp.checkpoint.files import load_state_dict_checked, read_file
from vlp.checkpoint.safetensors_meta import FORMAT, exported_model_config
from vlp.export.errors import ExportError

FILE = "model.safetensors"


def plain_tensors(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, none sharing memory with another: safetensors refuses
    aliases (views such as the q/k/v chunks of one matrix) and needs contiguous data (channels-last
    and transposed tensors are not)."""
    out, storages = {}, set()
    for key, tensor in state_dict.items():
        t = tensor.detach().cpu().contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in storages:
            t = t.clone()
            storage = t.untyped_storage().data_ptr()
        storages.add(storage)
        out[key] = t
    return out


def validate(source) -> None:
    """Every vlp model can be written as a plain state dict."""


def left_out(source) -> list[str]:
    """Nothing: every tensor of the model is written."""
    return []


def write(source, out: Path) -> list[str]:
    """Write ``out/model.safetensors``; returns the file names written."""
    from safetensors.torch import save_file

    metadata = {
        "format": "pt",
        "vlp_format": FORMAT,
        "vlp_version": __version__,
        "architecture": source.name,
        "model_config": json.dumps(dataclasses.asdict(source.model_cfg)),
    }
    save_file(plain_tensors(source.state_dict), str(out / FILE), metadata=metadata)
    return [FILE]


def load(path: str | Path, device: str = "cpu"):
    """Rebuild the model of a vlp safetensors export: ``(model, mean, std)``, as ``build_model``.

    Raises FileNotFoundError, ExportError (not a vlp export) or CheckpointError (weights do not fit).
    """
    from vlp.models.registry import build_model

    model_cfg = exported_model_config(path)
    if model_cfg is None:
        if not Path(path).is_file():
            raise FileNotFoundError(f"safetensors export not found: {path}")
        raise ExportError(f"{path} is not a vlp safetensors export (no vlp_format '{FORMAT}' in its metadata)")
    model, mean, std = build_model(model_cfg)
    load_state_dict_checked(model, read_file(path), path, model_cfg.name)
    return model.to(device).eval(), mean, std


def check(source, out: Path, batch) -> dict:
    """Rebuild the model from the written file; max abs differences against the source on
    ``batch`` (a :class:`vlp.export.parity.ParityBatch`)."""
    from vlp.export.parity import compare, model_features, summarize

    model, mean, std = load(out / FILE)
    diffs = compare(batch.reference, model_features(model, batch.pixels_BCSS, batch.text_BL), raw=True)
    return summarize(diffs, preprocess_equal=(tuple(mean), tuple(std)) == (source.mean, source.std))
