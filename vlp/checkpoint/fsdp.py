"""FSDP checkpoint folders (``train.backend: fsdp``), read and consolidated without a process group.

A step folder ``step_N/`` holds the sharded model and optimizer state written by
``torch.distributed.checkpoint`` (``*.distcp`` files and ``.metadata``), vlp's training state
(``client.pt``: step, config, data positions, RNG; read weights-only) and, written last, the
completion marker (``vlp_complete.json`` with ``"backend": "fsdp"``). Consolidation allocates each
model tensor from the checkpoint's own metadata and has DCP fill it, so no model needs building.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.checkpoint.files import CheckpointError
from vlp.checkpoint.step_folders import MARKER, newest_tag

CLIENT_FILE = "client.pt"
BACKEND = "fsdp"


def fsdp_tag(path: str | Path) -> Path | None:
    """The FSDP step folder ``path`` names (itself, or a checkpoints folder's ``latest`` or newest
    complete one), or None when ``path`` is no FSDP checkpoint."""
    return newest_tag(path, BACKEND) if Path(path).is_dir() else None


def read_client_state(tag: Path) -> dict:
    """vlp's training state of a step folder (weights-only: tensors and plain containers)."""
    try:
        return torch.load(tag / CLIENT_FILE, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - a damaged or unsafe file: say which, never unpickle code
        raise CheckpointError(f"{tag / CLIENT_FILE}: not readable as vlp's training state ({e})") from None


def consolidated_model(tag: Path) -> dict[str, torch.Tensor]:
    """The full model state dict of an FSDP step folder, on the CPU, in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    try:
        reader = dcp.FileSystemReader(str(tag))
        meta = reader.read_metadata()
        template = {
            key: torch.empty(tuple(md.size), dtype=md.properties.dtype)
            for key, md in meta.state_dict_metadata.items()
            if key.startswith("model.") and isinstance(md, TensorStorageMetadata)
        }
        dcp.load(template, storage_reader=reader, no_dist=True)
    except Exception as e:  # noqa: BLE001 - DCP raises assorted errors on missing or cut files
        raise CheckpointError(f"{tag}: cannot read the FSDP checkpoint ({e})") from None
    return {key.removeprefix("model."): value for key, value in template.items()}


def read_as_vlp_checkpoint(path: str | Path) -> dict:
    """An FSDP step folder as the dict a vlp checkpoint file holds (``format``, ``config``, ``step``,
    ``model`` = the consolidated weights), for evaluation and export."""
    tag = fsdp_tag(path)
    if tag is None:
        raise CheckpointError(f"{path}: no complete FSDP checkpoint (a step_* folder whose {MARKER} says fsdp)")
    client = read_client_state(tag)
    if "config" not in client:
        raise CheckpointError(f"{tag}: an FSDP checkpoint without vlp's config (not written by vlp)")
    return {**client, "model": consolidated_model(tag)}
