"""What a training run saves of itself and checks when it resumes: its random generators, the data
positions of every rank, and whether a checkpoint can be resumed at all (the files are written and
read by :mod:`vlp.checkpoint`)."""

from __future__ import annotations

import random
from collections import Counter

import torch

from vlp.checkpoint import CHECKPOINT_FORMAT, CheckpointError
from vlp.config import ConfigError


def rng_states(device) -> dict:
    """This process's random generators (Python, torch CPU, the CUDA device's), for a checkpoint."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_states(state: dict, device) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)


def check_resumable(path, state: dict, model_name: str) -> None:
    """A training run may resume from ``state`` (read from ``path``): a vlp training checkpoint of the
    same architecture. Raises CheckpointError or ConfigError saying what to do instead."""
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a vlp training checkpoint (use model.pretrained for weights)")
    saved = state["config"]["model"]["name"]
    if saved != model_name:
        raise ConfigError(
            f"{path}: checkpoint was trained with model.name='{saved}', the config says "
            f"'{model_name}'; resume with the same architecture or start a new output_dir"
        )


def data_state_of_rank(data: list[dict], rank: int, world: int) -> dict | None:
    """This rank's saved data position from a checkpoint's per-rank list. Saved with another world
    size, positions cannot be replayed (the loader warns and starts a new epoch); rank 0 then carries
    the run's totals (skipped samples, cut captions) so that the reports go on adding up."""
    if len(data) == world:
        return data[rank]
    if not data:
        return None
    skipped: Counter = Counter()
    for d in data:
        skipped.update(d.get("skipped", {}))
    truncated = sum(int(d.get("truncated_captions", 0)) for d in data)
    if rank:
        return {**data[0], "skipped": {}, "truncated_captions": 0}
    return {**data[0], "skipped": dict(skipped), "truncated_captions": truncated}
