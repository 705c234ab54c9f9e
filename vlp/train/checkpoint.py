"""Step checkpoints: written atomically, the newest N kept, a ``latest`` pointer updated last.

A checkpoint file is either complete or absent: it is written to a temporary name, flushed to
disk (fsync) and renamed. A checkpoint that fails to load (truncated, corrupt) is reported and
the previous one is used.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch

from vlp.models.loading import CheckpointError, read_file

log = logging.getLogger(__name__)

_NAME = re.compile(r"^step_(\d{8})\.pt$")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, write) -> None:
    """Call ``write(file)`` on a temporary file, fsync it and rename it to ``path``."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


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
        atomic_write_bytes(path, lambda f: torch.save(state, f))
        atomic_write_bytes(self.folder / "latest", lambda f: f.write(path.name.encode()))
        self._prune()
        return path

    def _prune(self) -> None:
        for old in self.list()[: -self.keep]:
            old.unlink(missing_ok=True)

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
            return Path(which), read_file(which)
        candidates = self.list()
        newest = self.latest()
        if newest is not None and newest in candidates:
            candidates = candidates[: candidates.index(newest) + 1]
        for path in reversed(candidates):
            try:
                return path, read_file(path)
            except CheckpointError as e:
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", path, e)
        return None
