"""Step checkpoints: written atomically, the newest N kept, a ``latest`` pointer updated last.

Retention deletes only checkpoints of earlier steps than the one just written (never that one,
never a later one), and only after ``latest`` names the new file, so ``latest`` always names a
complete checkpoint. Whose checkpoints a folder holds is settled before training starts
(:mod:`vlp.train.run_folder`).

A checkpoint file is either complete or absent: it is written to a temporary name, flushed to
disk (fsync) and renamed; a SHA-256 of its bytes is written beside it (``step_N.pt.sha256``). A
checkpoint that fails to load (truncated, corrupt, checksum mismatch) is reported and the previous
one is used. A write that fails (full disk) leaves the previous checkpoints as they were.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path

import torch

from vlp.checkpoint import CHECKPOINT_FORMAT, CheckpointError, read_file
from vlp.config import ConfigError
from vlp.train.run_folder import older_to_delete

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file, fsync it and rename it to ``path``. If anything
    fails (a full disk), the temporary file is removed and ``path`` is left as it was."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


class _HashingWriter:
    """A file wrapper that hashes (SHA-256) what goes through it."""

    def __init__(self, f):
        self.f, self.sha = f, hashlib.sha256()

    def write(self, data) -> int:
        self.sha.update(data)
        return self.f.write(data)

    def flush(self) -> None:
        self.f.flush()


def file_sha256(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return sha.hexdigest()


class Checkpointer:
    """Saves and finds checkpoints in ``folder`` (only the caller with ``enabled`` writes)."""

    def __init__(self, folder: str | Path, keep: int = 3, enabled: bool = True):
        self.folder, self.keep, self.enabled = Path(folder), keep, enabled

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}.pt"

    def save(self, step: int, state: dict) -> Path:
        path = self.path_for(step)
        if not self.enabled:
            return path
        self.folder.mkdir(parents=True, exist_ok=True)
        digest = {}

        def write(f):
            hashing = _HashingWriter(f)
            torch.save(state, hashing)
            digest["sha256"] = hashing.sha.hexdigest()

        atomic_write_bytes(path, write)
        # the checksum lets a load tell a damaged file (bit rot, a partial copy) from a good one
        atomic_write_bytes(self._sum_path(path), lambda f: f.write(digest["sha256"].encode()))
        atomic_write_bytes(self.folder / "latest", lambda f: f.write(path.name.encode()))
        self._prune(step)
        return path

    @staticmethod
    def _sum_path(path: Path) -> Path:
        return path.with_name(path.name + ".sha256")

    def _prune(self, step: int) -> None:
        for old in older_to_delete(self.list(), step, self.keep):
            old.unlink(missing_ok=True)
            self._sum_path(old).unlink(missing_ok=True)

    def verify(self, path: Path) -> None:
        """Raise CheckpointError if ``path``'s SHA-256 differs from the one written with it."""
        sums = self._sum_path(Path(path))
        if sums.is_file() and sums.read_text().strip() != file_sha256(Path(path)):
            raise CheckpointError(f"{path}: checksum mismatch (the file was damaged after it was written)")

    def list(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary files are ignored)."""
        if not self.folder.is_dir():
            return []
        return sorted(p for p in self.folder.iterdir() if _NAME.match(p.name))

    def latest(self) -> Path | None:
        pointer = self.folder / "latest"
        if pointer.is_file():
            p = self.folder / pointer.read_text().strip()
            if p.is_file():
                return p
        found = self.list()
        return found[-1] if found else None

    def load(self, which: str) -> tuple[Path, dict] | None:
        """Load ``latest`` (falling back to older ones if it is unreadable) or an explicit path."""
        if which != "latest":
            self.verify(Path(which))
            return Path(which), read_file(which)
        candidates = self.list()
        newest = self.latest()
        if newest is not None and newest in candidates:
            candidates = candidates[: candidates.index(newest) + 1]
        for path in reversed(candidates):
            try:
                self.verify(path)
                return path, read_file(path)
            except CheckpointError as e:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
        return None


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
