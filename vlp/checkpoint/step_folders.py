"""Checkpoints written as one folder per step by every rank (DeepSpeed, FSDP): the protocol that makes
such a folder complete or ignored, shared by the backends that write them.

A save removes what an interrupted save of the same step left, lets every rank write its part, and
only when all have finished writes :data:`MARKER` (``{"step", "files", "backend", ...}``) into the
folder, then the checkpoints folder's ``latest`` pointer, each atomically; retention deletes older
complete folders of the same backend. A folder without the marker is never read. Markers written
before the backend was recorded are DeepSpeed's.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

from vlp.checkpoint.files import CheckpointError
from vlp.checkpoint.writing import atomic_write_bytes, older_to_delete

log = logging.getLogger(__name__)

MARKER = "vlp_complete.json"


def backend_of(tag: Path) -> str:
    """The backend that wrote a complete step folder ("" when it has no readable marker)."""
    try:
        return json.loads((Path(tag) / MARKER).read_text()).get("backend", "deepspeed")
    except (OSError, ValueError):
        return ""


def complete_tags(folder: Path, backend: str | None = None) -> list[Path]:
    """Complete step folders (with the marker; of ``backend`` when given), oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    tags = sorted(p for p in folder.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / MARKER).is_file())
    return [t for t in tags if backend is None or backend_of(t) == backend]


def newest_tag(path: str | Path, backend: str) -> Path | None:
    """The complete ``backend`` step folder ``path`` names: itself, or a checkpoints folder's
    ``latest``, or its newest complete one; None when there is none."""
    path = Path(path)
    if (path / MARKER).is_file():
        return path if backend_of(path) == backend else None
    pointer = path / "latest"
    if pointer.is_file():
        tag = path / pointer.read_text().strip()
        if (tag / MARKER).is_file() and backend_of(tag) == backend:
            return tag
    tags = complete_tags(path, backend)
    return tags[-1] if tags else None


class StepFolderCheckpointer:
    """The interface and ``latest`` semantics of :class:`vlp.checkpoint.writing.Checkpointer` for
    step folders; every rank calls :meth:`save` and :meth:`load`. A backend supplies
    :meth:`_write` (every rank's part of a step), :meth:`_read` (load one complete folder) and its
    :attr:`backend` name; ``barrier()`` waits for every rank."""

    backend = ""

    def __init__(self, folder: str | Path, keep: int, is_main: bool, barrier):
        self.folder, self.keep, self.is_main, self.barrier = Path(folder), keep, is_main, barrier

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def _write(self, path: Path, state: dict) -> None:
        raise NotImplementedError

    def _read(self, tag: Path) -> dict | None:
        """Load ``tag`` into the model and optimizer; vlp's training state, or None if nothing loaded."""
        raise NotImplementedError

    def _marker(self, step: int, path: Path) -> dict:
        return {"step": step, "files": sorted(p.name for p in path.iterdir()), "backend": self.backend}

    def save(self, step: int, state: dict) -> Path:
        """``state``: vlp's training state (step, config, RNG, data positions, ...)."""
        path = self.path_for(step)
        if self.is_main and path.exists():  # an earlier, interrupted save of this step
            shutil.rmtree(path)
        self.barrier()
        self._write(path, state)
        self.barrier()  # every rank's part is on disk
        if self.is_main:
            marker = self._marker(step, path)
            atomic_write_bytes(path / MARKER, lambda f: f.write(json.dumps(marker).encode()))
            atomic_write_bytes(self.folder / "latest", lambda f: f.write(path.name.encode()))
            for old in older_to_delete(complete_tags(self.folder, self.backend), step, self.keep):
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return path

    def latest(self) -> Path | None:
        return newest_tag(self.folder, self.backend)

    def load(self, which: str) -> tuple[Path, dict] | None:
        """``latest`` (falling back to older complete folders when one is unreadable) or an explicit
        folder; returns ``(folder, vlp's training state)``, or None when there is nothing to load."""
        if which != "latest":
            tag = newest_tag(which, self.backend)
            if tag is None:
                raise CheckpointError(f"{which}: no complete {self.backend} checkpoint (a step_* folder with {MARKER})")
            candidates = [tag]
        else:
            newest = self.latest()
            tags = complete_tags(self.folder, self.backend)
            candidates = [t for t in tags if newest is None or t.name <= newest.name]
        for tag in reversed(candidates):
            try:
                client = self._read(tag)
            except Exception as e:  # noqa: BLE001 - damaged files raise assorted errors: try the previous
                if which != "latest":
                    raise CheckpointError(f"{tag}: cannot load the {self.backend} checkpoint ({e})") from None
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", tag, e)
                continue
            if client is not None:
                return tag, client
        return None
