"""The metadata of a ``vlp export --format safetensors`` file: the ``ModelConfig`` that rebuilds its
model (the writer is :mod:`vlp.export.safetensors_file`). Reading it never unpickles anything."""

from __future__ import annotations

import json
from pathlib import Path

from vlp.checkpoint.files import CheckpointError
from vlp.config import ConfigError, ModelConfig, config_from_dict

FORMAT = "vlp-safetensors-v1"


def exported_model_config(path: str | Path) -> ModelConfig | None:
    """The ``ModelConfig`` in a vlp safetensors export's metadata; None for any other file.

    Raises CheckpointError when the file says it is a vlp export but its config does not parse.
    """
    path = Path(path)
    if path.suffix != ".safetensors" or not path.is_file():
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # not a safetensors file at all: the caller's reader reports that
        return None
    return model_config_in(metadata, path)


def model_config_in(metadata: dict[str, str], path) -> ModelConfig | None:
    """The ``ModelConfig`` a vlp export wrote into safetensors ``metadata`` (of the file ``path``);
    None when the metadata is not a vlp export's. CheckpointError when its config does not parse."""
    if metadata.get("vlp_format") != FORMAT:
        return None
    try:
        return config_from_dict({"model": json.loads(metadata["model_config"])}, where=str(path)).model
    except (KeyError, ValueError, ConfigError) as e:
        raise CheckpointError(f"{path}: the model_config in its safetensors metadata is not readable ({e})") from None
