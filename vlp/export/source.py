"""What is exported: a vlp model rebuilt from a checkpoint exactly as ``vlp.load_model`` does.

:func:`load_source` is the one place that knows the kinds of input (a vlp training checkpoint file
or DeepSpeed checkpoint folder, a safetensors file written by ``vlp export``, an open_clip
checkpoint file with its architecture name); every format adapter receives the same
:class:`ExportSource`. A new kind of input is one more branch there.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.config import ModelConfig
from vlp.export.errors import ExportError
from vlp.models.loading import (
    _architecture_of,
    extract_state_dict,
    is_vlp_checkpoint,
    load_state_dict_checked,
    read_file,
)


@dataclass
class ExportSource:
    """A model ready to export: ``model`` (eval mode, CPU, weights loaded strictly), the
    ``model_cfg`` that rebuilds its architecture, its image normalisation and where it came from."""

    path: Path
    kind: str  # "vlp checkpoint" | "vlp DeepSpeed checkpoint" | "vlp safetensors export" | "open_clip checkpoint"
    model: torch.nn.Module
    model_cfg: ModelConfig
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @property
    def name(self) -> str:
        return self.model_cfg.name

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def load_source(path: str | Path, model_name: str | None = None) -> ExportSource:
    """Read ``path`` safely (safetensors or ``torch.load(weights_only=True)``) and rebuild its model.

    ``path`` is a vlp checkpoint (architecture from its saved config): a file, or a DeepSpeed step
    folder (or checkpoints folder: its ``latest``) whose ZeRO shards are consolidated to fp32; a
    ``model.safetensors`` written by ``vlp export --format safetensors`` (architecture from its
    metadata); or an open_clip checkpoint file (``model_name`` required, e.g. ``ViT-B-32``; it also
    overrides the architecture the other kinds carry).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable, unsafe to unpickle, or weights that do not fit the architecture.
        ExportError: a folder that is not a DeepSpeed checkpoint, or a plain weights file without ``model_name``.
    """
    from vlp.export.safetensors_file import exported_model_config
    from vlp.models.registry import build_model

    path = Path(path)
    if path.is_dir():
        from vlp.train.deepspeed_backend import is_deepspeed_checkpoint, read_as_vlp_checkpoint

        if not is_deepspeed_checkpoint(path):
            raise ExportError(
                f"--checkpoint {path} is a folder but not a DeepSpeed checkpoint written by vlp (no step_* folder "
                "with vlp_complete.json); expected a vlp checkpoint file (runs/NAME/checkpoints/step_*.pt), a "
                "DeepSpeed step or checkpoints folder, or an open_clip .pt/.bin/.safetensors file with --model"
            )
        obj = read_as_vlp_checkpoint(path)  # ZeRO shards consolidated to fp32, read weights_only
    else:
        obj = read_file(path)
    if is_vlp_checkpoint(obj):
        kind = "vlp DeepSpeed checkpoint" if path.is_dir() else "vlp checkpoint"
        model_cfg = ModelConfig(name=model_name) if model_name else _architecture_of(obj, path)
    elif model_name:
        model_cfg, kind = ModelConfig(name=model_name), "open_clip checkpoint"
    elif (model_cfg := exported_model_config(path)) is not None:
        kind = "vlp safetensors export"
    else:
        raise ExportError(
            f"{path} is not a vlp checkpoint (no 'format': 'vlp-checkpoint-v1') nor a vlp safetensors "
            "export; for an open_clip checkpoint file pass --model NAME, its architecture (e.g. ViT-B-32)"
        )
    model, mean, std = build_model(model_cfg)
    load_state_dict_checked(model, extract_state_dict(obj), path, model_cfg.name)
    return ExportSource(path, kind, model.eval(), model_cfg, tuple(mean), tuple(std))
