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
import re
from pathlib import Path

import torch

from vlp.checkpoint.files import CheckpointError, read_file

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


STEP_NAME = re.compile(r"^step_(\d{8})(\.pt)?$")  # a step checkpoint: a .pt file or a step folder


def step_of(path: Path) -> int:
    """The step of a checkpoint path ``step_NNNNNNNN[.pt]``."""
    m = STEP_NAME.match(Path(path).name)
    if m is None:
        raise ValueError(f"{path} is not a step checkpoint name")
    return int(m.group(1))


def older_to_delete(checkpoints: list[Path], step: int, keep: int) -> list[Path]:
    """Retention: of the checkpoints before ``step`` (the one just written), all but the newest
    ``keep - 1``. A checkpoint at or after ``step`` is never deleted, so the one just written, and
    anything a resumed run has not reached again, survive."""
    older = [p for p in checkpoints if step_of(p) < step]
    return older[: max(len(older) - (keep - 1), 0)]
