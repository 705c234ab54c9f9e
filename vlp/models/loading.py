"""Loading weights: vlp checkpoints, open_clip checkpoint files, safetensors.

Everything is read with ``torch.load(weights_only=True)`` or safetensors: a file that would need
to execute code to load is refused.
"""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import torch

CHECKPOINT_FORMAT = "vlp-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, unsafe or does not fit the model."""


def read_file(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint file safely; raises FileNotFoundError or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device=str(map_location))
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None
    _check_container(path)
    try:
        obj = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        raise CheckpointError(
            f"{path}: refused to load: it holds objects other than tensors and plain containers, "
            f"which could run code (weights_only=True). Detail: {str(e).splitlines()[0]}"
        ) from None
    except (RuntimeError, EOFError, OSError) as e:
        raise CheckpointError(f"{path}: truncated or not a torch checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, found {type(obj).__name__}")
    return obj


def _check_container(path: Path) -> None:
    """Raise CheckpointError when ``path`` is neither a torch zip file nor a pickle.

    torch.load would report such a file (the ``.sha256`` beside a checkpoint, a text file) as an
    unsafe pickle, which misleads; this says what the file is instead.
    """
    with open(path, "rb") as f:
        head = f.read(2)
    if head[:2] == b"PK" or head[:1] == b"\x80":  # zip archive (torch.save) or pickle protocol >= 2
        return
    hint = f"; the checkpoint is {path.with_suffix('')}" if path.suffix == ".sha256" else ""
    what = "an empty file" if not head else f"starts with {head!r}, neither a zip archive nor a pickle"
    raise CheckpointError(f"{path}: not a torch checkpoint ({what}){hint}")


def is_vlp_checkpoint(obj: dict) -> bool:
    return obj.get("format") == CHECKPOINT_FORMAT


def extract_state_dict(obj: dict) -> dict[str, torch.Tensor]:
    """The model state dict of a vlp checkpoint, an open_clip file (``state_dict`` wrapped or
    bare) or a DDP/compiled model (``module.`` / ``_orig_mod.`` prefixes stripped)."""
    if is_vlp_checkpoint(obj):
        sd = obj["model"]
    elif "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
    else:
        sd = obj
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def load_state_dict_checked(model: torch.nn.Module, sd: dict, source, model_name: str = "") -> None:
    """Load ``sd`` into ``model`` strictly; on mismatch raise CheckpointError saying what differs."""
    own = model.state_dict()
    # ZeRO-3 keeps 0-dim parameters (the logit scale) as 1-element vectors
    sd = {k: v.reshape(()) if k in own and own[k].dim() == 0 and tuple(v.shape) == (1,) else v for k, v in sd.items()}
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    wrong = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        if wrong:
            k = wrong[0]
            parts.append(
                f"{len(wrong)} with other shapes (e.g. {k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)})"
            )
        raise CheckpointError(
            f"{source}: weights do not fit architecture '{model_name or type(model).__name__}': "
            + "; ".join(parts)
            + ". Is --model / model.name the architecture the file was trained with?"
        )
    model.load_state_dict(sd, strict=True)


def load_weights(model: torch.nn.Module, path: str | Path, model_name: str = "") -> None:
    """Load a checkpoint file's weights into ``model`` (strict, actionable error on mismatch)."""
    load_state_dict_checked(model, extract_state_dict(read_file(path)), path, model_name)


def load_model(path_or_name: str, model_name: str | None = None, device: str = "cpu"):
    """Load a model for inference.

    ``path_or_name`` is a vlp checkpoint (architecture read from its config), an open_clip
    checkpoint or safetensors file (``model_name`` required), or an architecture name
    (random init). Returns ``(model, preprocess, tokenizer)``: ``model.encode_image(pixels)`` and
    ``model.encode_text(token_ids)`` return L2-normalised features, ``preprocess`` maps a PIL
    image to a 3xHxW tensor, ``tokenizer(list[str])`` returns token ids.
    """
    from vlp.data.tokenizer import get_tokenizer
    from vlp.data.transforms import eval_transform
    from vlp.models.registry import build_model, image_size

    path = Path(path_or_name)
    if path.is_dir() and _is_deepspeed_dir(path):
        from vlp.train.deepspeed_backend import read_as_vlp_checkpoint

        obj = read_as_vlp_checkpoint(path)  # ZeRO shards consolidated to fp32
        name = model_name or _architecture_of(obj, path)
        model, mean, std = build_model(name)
        load_state_dict_checked(model, extract_state_dict(obj), path, getattr(name, "name", name))
    elif path.is_file():
        obj = read_file(path)
        exported = None if model_name else _exported_config(path)
        if is_vlp_checkpoint(obj) and not model_name:
            name = _architecture_of(obj, path)  # a ModelConfig: custom towers are rebuilt as trained
        elif exported is not None:
            name = architecture_only(exported)
        elif not model_name:
            raise CheckpointError(
                f"{path} is not a vlp checkpoint: pass model_name (the open_clip architecture, e.g. 'ViT-B-32')"
            )
        else:
            name = model_name
        model, mean, std = build_model(name)
        load_state_dict_checked(model, extract_state_dict(obj), path, getattr(name, "name", name))
    elif "/" not in str(path_or_name) and not path.suffix and model_name in (None, str(path_or_name)):
        name = str(path_or_name)  # an architecture name: random weights
        model, mean, std = build_model(name)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path_or_name}")
    model = model.to(device).eval()
    return model, eval_transform(image_size(model), mean, std), get_tokenizer(name)


def _architecture_of(obj: dict, path):
    """The ModelConfig a vlp checkpoint was trained with, set to build the architecture only: the
    checkpoint holds every weight, so tower weight files and the init checkpoint are not read."""
    from vlp.config import ConfigError, config_from_dict

    try:
        mcfg = config_from_dict(obj["config"], where=str(path)).model
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the config saved in the checkpoint is not readable ({e})") from None
    return architecture_only(mcfg)


def architecture_only(mcfg):
    """``mcfg`` (a ModelConfig) set to build the architecture without reading any weight file: no
    init checkpoint, no tower weights (the file being loaded holds every weight)."""
    vision = dataclasses.replace(mcfg.vision, weights="")
    text = dataclasses.replace(mcfg.text, pretrained=False)
    return dataclasses.replace(mcfg, pretrained="", vision=vision, text=text)


def _is_deepspeed_dir(path: Path) -> bool:
    from vlp.train.deepspeed_backend import is_deepspeed_checkpoint

    return is_deepspeed_checkpoint(path)


def _exported_config(path: Path):
    """The architecture in a ``vlp export --format safetensors`` file's metadata (None otherwise)."""
    from vlp.export.safetensors_file import exported_model_config

    return exported_model_config(path)
