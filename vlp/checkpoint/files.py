"""vlp's own checkpoint files, read safely: ``torch.load(weights_only=True)`` or safetensors only (a
file that would need to run code to load is refused), the state dict found inside whatever wrapper
it has, and loaded into a model strictly with an error that says what differs. Also the dict a
training checkpoint holds (:func:`training_state`), so that its format lives in one place."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch

from vlp._version import __version__

CHECKPOINT_FORMAT = "vlp-checkpoint-v1"


class CheckpointError(ValueError):
    """A checkpoint that is unreadable, unsafe or does not fit the model."""


def read_file(path: str | Path, map_location="cpu") -> dict:
    """Read a checkpoint file safely; raises FileNotFoundError or CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_safetensors(path, map_location)[0]
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


def read_safetensors(path: str | Path, map_location="cpu") -> tuple[dict, dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file, in one opening; CheckpointError if unreadable."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device=str(map_location)) as f:
            return {k: f.get_tensor(k) for k in f.keys()}, (f.metadata() or {})  # noqa: SIM118 - not a dict
    except Exception as e:  # noqa: BLE001 - safetensors raises its own kinds for damaged files
        raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from None


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


def training_state(step: int, config: dict, world: int, **parts) -> dict:
    """The dict a vlp training checkpoint holds: ``format`` (:data:`CHECKPOINT_FORMAT`), the vlp
    version, the step, the resolved config (``Config.to_dict()``), the world size, and ``parts``
    (model, optimizer, scheduler and scaler state dicts, data positions, RNG states, ...)."""
    return {"format": CHECKPOINT_FORMAT, "vlp_version": __version__, "step": step, "config": config,
            "world": world, **parts}  # fmt: skip
