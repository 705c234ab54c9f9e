"""The one place that knows checkpoint kinds, for reading and for writing their formats: vlp
training checkpoints (``.pt``, the dict :func:`training_state` builds), DeepSpeed step folders
(read and consolidated), ``vlp export --format safetensors`` files and open_clip weight files.
:func:`resolve` tells them apart. Imports only :mod:`vlp.config` and third-party libraries.

- :mod:`vlp.checkpoint.files`: safe reading (weights-only), state-dict extraction, strict loading;
- :mod:`vlp.checkpoint.deepspeed`: DeepSpeed step folders, their marker and consolidation;
- :mod:`vlp.checkpoint.safetensors_meta`: the architecture in a safetensors export's metadata;
- :mod:`vlp.checkpoint.kinds`: which kind a path is, and the architecture that rebuilds it;
- :mod:`vlp.checkpoint.writing`: step ``.pt`` files written atomically with a checksum, ``latest``
  written last, retention (the DeepSpeed and FSDP backends write their folders with its helpers);
- :mod:`vlp.checkpoint.fsdp`: FSDP step folders, read and consolidated without a process group.
"""

from vlp.checkpoint.files import (
    CHECKPOINT_FORMAT,
    CheckpointError,
    extract_state_dict,
    is_vlp_checkpoint,
    load_state_dict_checked,
    load_weights,
    read_file,
    training_state,
)
from vlp.checkpoint.kinds import KINDS, ArchitectureNeeded, NotACheckpoint, Resolved, architecture_only, resolve

__all__ = [
    "CHECKPOINT_FORMAT",
    "KINDS",
    "ArchitectureNeeded",
    "CheckpointError",
    "NotACheckpoint",
    "Resolved",
    "architecture_only",
    "extract_state_dict",
    "is_vlp_checkpoint",
    "load_state_dict_checked",
    "load_weights",
    "read_file",
    "resolve",
    "training_state",
]
