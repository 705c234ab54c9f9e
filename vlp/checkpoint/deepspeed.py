"""DeepSpeed checkpoint folders, read and consolidated (the writing half is the training backend's,
:mod:`vlp.train.deepspeed_backend`). A step folder is complete when it holds the marker of
:mod:`vlp.checkpoint.step_folders`, written after every rank saved its shards; DeepSpeed's own
files are read with ``torch.load(weights_only=True)`` forced, with only DeepSpeed's plain record
classes allowed."""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import torch

from vlp.checkpoint.files import CheckpointError
from vlp.checkpoint.step_folders import MARKER, backend_of, complete_tags, newest_tag
from vlp.config import ConfigError

BACKEND = "deepspeed"


def import_deepspeed(device_type: str):
    """``import deepspeed`` with the CPU accelerator selected on CPU runs; a clear error if missing."""
    if device_type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"train.backend=deepspeed and reading its checkpoints need DeepSpeed: pip install 'vlp[deepspeed]' "
            f"(import failed: {e})"
        ) from None
    return deepspeed


def _deepspeed_record_classes() -> list:
    """The non-tensor classes DeepSpeed pickles into its checkpoints (plain records, no code)."""
    classes = []
    for module, names in (
        ("deepspeed.runtime.fp16.loss_scaler", ("LossScaler", "DynamicLossScaler")),
        ("deepspeed.utils.tensor_fragment", ("fragment_address",)),
        ("deepspeed.runtime.zero.config", ("ZeroStageEnum",)),
    ):
        try:
            mod = __import__(module, fromlist=list(names))
        except ImportError:
            continue
        classes += [getattr(mod, n) for n in names if hasattr(mod, n)]
    return classes


@contextlib.contextmanager
def weights_only_loads():
    """Every ``torch.load`` inside is ``weights_only=True`` (even where DeepSpeed asks otherwise),
    allowing only DeepSpeed's record classes; a file that needs anything else is refused."""
    old = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(_deepspeed_record_classes()):
            yield
    finally:
        if old is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = old


def is_deepspeed_checkpoint(path: str | Path) -> bool:
    """A step folder written by this backend (or a checkpoints folder holding them)."""
    path = Path(path)
    if not path.is_dir():
        return False
    if (path / MARKER).is_file():
        return backend_of(path) == BACKEND
    return (path / "latest").is_file() and bool(complete_tags(path, BACKEND))


def resolve_tag(path: str | Path) -> Path:
    """A DeepSpeed step folder from itself or from a checkpoints folder (its ``latest``)."""
    tag = newest_tag(path, BACKEND)
    if tag is None:
        raise CheckpointError(f"{path}: no complete DeepSpeed checkpoint (a step_* folder with {MARKER})")
    return tag


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """One fp32 state dict from a DeepSpeed step folder (or a checkpoints folder: its ``latest``),
    and vlp's client state (config, step). ZeRO 1-3 shards are merged from the optimizer's fp32
    master partitions by DeepSpeed's own ``zero_to_fp32``; stage 0 keeps the module's weights.
    Every file is read with ``weights_only=True`` (DeepSpeed's record classes allowed, nothing else)."""
    tag = resolve_tag(path)
    import_deepspeed("cpu")
    from deepspeed.utils import zero_to_fp32

    marker = json.loads((tag / MARKER).read_text())
    # mp_rank_00_model_states.pt, or under ZeRO-3 zero_pp_rank_0_mp_rank_00_model_states.pt
    model_file = min(tag.glob("*model_states.pt"), key=lambda p: len(p.name), default=tag / "missing_model_states.pt")
    with weights_only_loads():
        try:
            states = torch.load(model_file, map_location="cpu")
            if marker["zero_stage"] == 0:
                sd = {k: v.float() for k, v in states["module"].items()}
            else:
                sd = zero_to_fp32.get_fp32_state_dict_from_zero_checkpoint(str(tag.parent), tag=tag.name)
        except Exception as e:
            raise CheckpointError(f"{tag}: cannot read the DeepSpeed checkpoint ({e})") from None
    client = {k: v for k, v in states.items() if k in ("format", "vlp_version", "step", "config", "world", "ema")}
    return {k.removeprefix("module."): v.detach() for k, v in sd.items()}, client


def read_as_vlp_checkpoint(path: str | Path) -> dict:
    """A DeepSpeed step folder as the dict a vlp checkpoint file holds (``format``, ``config``,
    ``step``, ``model`` = the consolidated fp32 weights), for evaluation and export."""
    sd, client = consolidated_state_dict(path)
    if "config" not in client:
        raise CheckpointError(f"{path}: a DeepSpeed checkpoint without vlp's config (not written by vlp)")
    return {**client, "model": sd}
