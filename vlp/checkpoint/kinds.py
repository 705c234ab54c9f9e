"""What a path given as a checkpoint holds: :func:`resolve` tells the kinds apart, reads the weights
safely and says which architecture rebuilds them. `vlp.load_model`, `vlp eval`, `vlp export` and
`vlp caption` all go through it; a new kind of input is a new branch here and nowhere else.

Kinds, in the order they are tried:

- ``vlp FSDP checkpoint``: an FSDP step folder (or checkpoints folder: its ``latest``), the sharded
  weights consolidated; the architecture is the saved config's;
- ``vlp DeepSpeed checkpoint``: a DeepSpeed step folder (or checkpoints folder: its ``latest``),
  ZeRO shards consolidated to fp32; the architecture is the saved config's;
- ``vlp checkpoint``: a training checkpoint file (``format: vlp-checkpoint-v1``); the saved config's;
- ``vlp safetensors export``: ``vlp export --format safetensors``; the config in its metadata;
- ``open_clip folder``: ``open_clip_config.json`` + weights (what ``vlp export --format
  open_clip`` and open_clip's hub repos hold); the architecture and preprocessing are its config's;
- ``Hugging Face CLIP folder``: a transformers ``CLIPModel`` folder, mapped onto the open_clip
  architecture its config equals (:mod:`vlp.checkpoint.hf_clip`);
- ``open_clip checkpoint``: any other weights file (``state_dict`` wrapped or bare, ``module.``
  prefixes stripped); the architecture must be named.

Published weights by open_clip tag or ``hf-hub:`` id are :mod:`vlp.checkpoint.published`'s.

A named architecture (``model_name``) overrides the one a file carries.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.checkpoint import hf_clip
from vlp.checkpoint.deepspeed import is_deepspeed_checkpoint, read_as_vlp_checkpoint
from vlp.checkpoint.files import CheckpointError, extract_state_dict, is_vlp_checkpoint, read_file, read_safetensors
from vlp.checkpoint.fsdp import fsdp_tag
from vlp.checkpoint.fsdp import read_as_vlp_checkpoint as read_fsdp
from vlp.checkpoint.safetensors_meta import model_config_in
from vlp.checkpoint.storage import fetch, is_remote
from vlp.config import ConfigError, ModelConfig, PreprocessConfig, config_from_dict

KINDS = (
    "vlp FSDP checkpoint",
    "vlp DeepSpeed checkpoint",
    "vlp checkpoint",
    "vlp safetensors export",
    "open_clip checkpoint",
    "open_clip folder",
    "Hugging Face CLIP folder",
)


class NotACheckpoint(CheckpointError):
    """A folder that is no checkpoint of any kind vlp reads."""


class ArchitectureNeeded(CheckpointError):
    """A plain weights file: which architecture it belongs to must be given."""


@dataclass
class Resolved:
    """What :func:`resolve` found: ``kind`` (one of :data:`KINDS`), the ``model_cfg`` that rebuilds
    the architecture (every weight file it names set aside: ``state_dict`` holds them all), the
    weights, and ``checkpoint``: the whole dict of a vlp training checkpoint (step, config, ...)
    or None. ``preprocess`` is the image preprocessing the weights' source prescribes, where it
    prescribes one (None: the architecture's own)."""

    path: Path
    kind: str
    model_cfg: ModelConfig
    state_dict: dict[str, torch.Tensor]
    checkpoint: dict | None = None
    preprocess: dict | None = None


def resolve(path: str | Path, model_name: str | None = None) -> Resolved:
    """Read the checkpoint at ``path`` (see the module docstring for the kinds).

    Raises:
        FileNotFoundError: nothing at ``path``.
        NotACheckpoint: a folder of none of the kinds (the message lists them).
        ArchitectureNeeded: a plain weights file and no ``model_name``.
        CheckpointError: unreadable, unsafe to unpickle, or a saved config that does not parse.
    """
    if is_remote(path):  # s3://, gs://, ...: a verified local copy (vlp.checkpoint.storage)
        path = fetch(str(path))
    path = Path(path)
    if path.is_dir() and ((path / "open_clip_config.json").is_file() or hf_clip.model_type(path) is not None):
        return _published_folder(path, model_name)
    if path.is_dir():
        if fsdp_tag(path) is not None:
            obj, kind, saved = read_fsdp(path), KINDS[0], None
        elif is_deepspeed_checkpoint(path):
            obj, kind, saved = read_as_vlp_checkpoint(path), KINDS[1], None
        else:
            raise NotACheckpoint(
                f"{path} is a folder but not a DeepSpeed checkpoint (nor an FSDP one) written by vlp (no step_* "
                "folder with vlp_complete.json); expected a vlp checkpoint file (runs/NAME/checkpoints/step_*.pt), "
                "a DeepSpeed or FSDP step or checkpoints folder, or an open_clip .pt/.bin/.safetensors file with "
                "its architecture"
            )
    elif not path.exists():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    else:
        if path.suffix == ".safetensors":  # weights and metadata from one opening of the file
            obj, metadata = read_safetensors(path)
            saved = model_config_in(metadata, path)
        else:
            obj, saved = read_file(path), None
        kind = KINDS[2] if is_vlp_checkpoint(obj) else KINDS[3] if saved is not None else KINDS[4]
    checkpoint = obj if is_vlp_checkpoint(obj) else None
    own = architecture_of(obj, path) if checkpoint is not None else saved  # the config the file carries
    if model_name:  # the named architecture, with the weights' own preprocessing
        model_cfg = ModelConfig(name=model_name, preprocess=own.preprocess) if own else ModelConfig(name=model_name)
    elif own is not None:
        model_cfg = architecture_only(own)
    else:
        raise ArchitectureNeeded(
            f"{path} is not a vlp checkpoint: pass model_name (the open_clip architecture, e.g. 'ViT-B-32'); "
            f"tried: {', '.join(KINDS[:4])} (their architecture is inside), and {KINDS[4]} (needs it named)"
        )
    return Resolved(path, kind, model_cfg, extract_state_dict(obj), checkpoint, preprocess_in(own))


def _published_folder(path: Path, model_name: str | None) -> Resolved:
    """An open_clip or Hugging Face CLIP folder: its own architecture unless one is named."""
    from vlp.checkpoint.published import describe

    src = describe(str(path), model_name)
    kind = KINDS[5] if src.kind == "open_clip folder" else KINDS[6]
    pp = {k: list(v) if isinstance(v, tuple) else v for k, v in src.preprocess.items() if k != "fill_color"}
    model_cfg = ModelConfig(name=model_name or src.arch, preprocess=PreprocessConfig(**pp))
    return Resolved(path, kind, model_cfg, src.read(), None, pp or None)


def preprocess_in(mcfg: ModelConfig | None) -> dict | None:
    """The preprocessing fields a saved model config sets (None when it sets none)."""
    if mcfg is None:
        return None
    pp = {k: v for k, v in dataclasses.asdict(mcfg.preprocess).items() if v}
    return pp or None


def architecture_of(obj: dict, path) -> ModelConfig:
    """The ModelConfig a vlp checkpoint was trained with, set to build the architecture only."""
    try:
        mcfg = config_from_dict(obj["config"], where=str(path)).model
    except (ConfigError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path}: the config saved in the checkpoint is not readable ({e})") from None
    return architecture_only(mcfg)


def architecture_only(mcfg: ModelConfig) -> ModelConfig:
    """``mcfg`` set to build the architecture without reading any weight file: no init checkpoint,
    no tower weights (the file being loaded holds every weight)."""
    vision = dataclasses.replace(mcfg.vision, weights="")
    text = dataclasses.replace(mcfg.text, pretrained=False)
    return dataclasses.replace(mcfg, pretrained="", vision=vision, text=text)


WEIGHTS = ("live", "ema")


def select_weights(found: Resolved, weights: str = "live") -> Resolved:
    """``found`` with the weights asked for: ``live``, the trained weights as they are, or ``ema``,
    the moving average of the trainable weights a training checkpoint holds (``train.ema``; its
    ``state["ema"]["weights"]``) over the checkpoint's frozen weights and buffers.

    Raises CheckpointError (one line): an unknown choice, or ``ema`` of a checkpoint without one.
    """
    if weights not in WEIGHTS:
        raise CheckpointError(f"weights={weights!r}: choose one of {', '.join(WEIGHTS)}")
    if weights == "live":
        return found
    saved = (found.checkpoint or {}).get("ema")
    if not saved:
        why = "trained without train.ema" if found.checkpoint is not None else f"a {found.kind}, not a training one"
        raise CheckpointError(f"{found.path}: no EMA weights in this checkpoint ({why}); use the live weights")
    sd = dict(found.state_dict)
    for name, value in saved["weights"].items():
        if name not in sd:
            raise CheckpointError(f"{found.path}: its EMA holds {name}, which its model does not have")
        sd[name] = value.reshape(sd[name].shape)
    return dataclasses.replace(found, state_dict=sd)
