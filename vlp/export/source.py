"""What is exported: a vlp model rebuilt from a checkpoint exactly as ``vlp.load_model`` does.

:func:`load_source` reads any kind of checkpoint through :func:`vlp.checkpoint.kinds` (the one
place that knows the kinds) and rebuilds its model; every format adapter receives the same
:class:`ExportSource`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.checkpoint import ArchitectureNeeded, NotACheckpoint, resolve
from vlp.checkpoint.kinds import select_weights
from vlp.config import ModelConfig
from vlp.export.errors import ExportError


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
    weights: str = "live"  # or "ema": a training checkpoint's moving average of its weights (train.ema)

    @property
    def name(self) -> str:
        return self.model_cfg.name

    @property
    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def load_source(path: str | Path, model_name: str | None = None, weights: str = "live") -> ExportSource:
    """Read ``path`` safely (safetensors or ``torch.load(weights_only=True)``) and rebuild its model.

    ``path`` is any checkpoint :func:`vlp.checkpoint.kinds` reads: a vlp checkpoint file or
    DeepSpeed folder (architecture from its saved config), a ``model.safetensors`` written by ``vlp
    export --format safetensors`` (from its metadata), or an open_clip checkpoint file
    (``model_name`` required, e.g. ``ViT-B-32``; it also overrides the architecture the others carry).
    ``weights``: ``live`` (as trained) or ``ema`` (the checkpoint's ``train.ema`` average; see
    :func:`vlp.checkpoint.kinds.select_weights`).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        CheckpointError: unreadable, unsafe to unpickle, weights that do not fit the architecture, or
            ``ema`` asked of a checkpoint without an EMA.
        ExportError: a folder that is not a DeepSpeed checkpoint, or a plain weights file without ``model_name``.
    """
    from vlp.models.registry import build_loaded

    try:
        found = resolve(path, model_name)
    except NotACheckpoint as e:
        raise ExportError(f"--checkpoint {e}") from None
    except ArchitectureNeeded:
        raise ExportError(
            f"{path} is not a vlp checkpoint (no 'format': 'vlp-checkpoint-v1') nor a vlp safetensors "
            "export; for an open_clip checkpoint file pass --model NAME, its architecture (e.g. ViT-B-32)"
        ) from None
    model, mcfg = build_loaded(select_weights(found, weights))  # exported as the plain model: LoRA merged
    pp = mcfg.preprocess
    return ExportSource(found.path, found.kind, model.eval(), mcfg, tuple(pp.mean), tuple(pp.std), weights)


def load_published(pretrained: str, model_name: str | None = None) -> ExportSource:
    """Published weights (an open_clip tag of ``model_name``, ``hf-hub:`` id, folder or file; see
    :mod:`vlp.checkpoint.published`) as an export source, with their preprocessing."""
    from vlp.config import ModelConfig
    from vlp.models.registry import build

    mcfg = (
        ModelConfig(name=model_name, pretrained=str(pretrained))
        if model_name
        else ModelConfig(pretrained=str(pretrained))
    )
    model, mcfg = build(mcfg)
    pp = mcfg.preprocess
    return ExportSource(
        Path(str(pretrained)),
        "published weights",
        model.eval(),
        dataclasses.replace(mcfg, pretrained=""),
        tuple(pp.mean),
        tuple(pp.std),
    )
