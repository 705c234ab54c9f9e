"""A run folder on object storage: ``train.output_dir: s3://bucket/run`` (any fsspec URL).

The run writes its folder on local disk first (the *staging* folder, ``train.staging_dir``, by
default ``~/.cache/vlp/staging/<name>-<hash>``), with every local guarantee (atomic, checksummed
checkpoints; ``latest`` last), and :class:`RemoteRun` mirrors it to the URL in the order that keeps
the guarantees on storage without renames (:mod:`vlp.checkpoint.storage`): after each checkpoint,
every complete local checkpoint the storage lacks (oldest first: checkpoint, then its checksum or
marker), then ``latest``, then the run's other files (config, metrics.jsonl, TensorBoard, eval
results); then the checkpoints retention dropped locally are deleted remotely.

A checkpoint whose upload fails after the retries is logged in one line and kept locally; the
next checkpoint's sync uploads it, and so does the start of a run resumed with the same staging
folder. The end of the run waits for the last upload; if that fails, the run ends with a one-line
error naming the local copy (exit status 4), and ``--resume latest`` uploads it once the storage is back.

A resumed run (``--resume latest``) on a machine without the staging folder downloads the remote
``latest`` checkpoint (verified against its checksum) and the run's other files first.

Step folders (DeepSpeed, FSDP) are uploaded by local rank 0 of every node (each node's staging
holds its own ranks' files), the marker only once every node's upload has succeeded.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import threading
from pathlib import Path

from vlp.checkpoint.step_folders import MARKER
from vlp.checkpoint.storage import (
    StorageError,
    Store,
    complete_remote,
    download_checkpoint,
    is_remote,
    newest_remote,
)
from vlp.checkpoint.writing import STEP_NAME, step_of
from vlp.config import ConfigError
from vlp.distributed import all_gather_objects, barrier
from vlp.train.run_folder import remove_run_files

log = logging.getLogger(__name__)

SKIPPED = ("checkpoints", "feature_cache")  # checkpoints have their own order; the cache is rebuilt where it is missing


def staging_folder(url: str, staging_dir: str = "") -> Path:
    """The local folder a run with output ``url`` writes first: ``staging_dir`` when given, else one
    named after the URL in vlp's cache (the same for the same URL, so a rerun finds what it left)."""
    if staging_dir:
        return Path(staging_dir)
    cache = Path(os.environ.get("VLP_CACHE") or Path.home() / ".cache" / "vlp")
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", url.split("://", 1)[-1].strip("/"))[-60:]
    return cache / "staging" / f"{name}-{hashlib.sha256(url.rstrip('/').encode()).hexdigest()[:8]}"


def _local_complete(folder: Path) -> list[Path]:
    """Complete local checkpoints (a ``.pt`` with its checksum, a step folder with its marker), oldest first."""
    if not folder.is_dir():
        return []
    found = [
        p
        for p in folder.iterdir()
        if STEP_NAME.match(p.name)
        and ((p.suffix == ".pt" and p.with_name(p.name + ".sha256").is_file()) or (p / MARKER).is_file())
    ]
    return sorted(found, key=step_of)


class RemoteRun:
    """Mirrors the staging folder ``staging`` of a run to ``url`` (see the module docstring)."""

    def __init__(self, url: str, staging: Path, env):
        self.url, self.staging, self.env = url.rstrip("/"), Path(staging), env
        self.store = Store(self.url)
        self._sent: dict[str, tuple[int, int]] = {}  # other files: (size, mtime) last uploaded
        self.pending: str = ""  # the last sync's failure, "" when the storage has everything
        self._thread: threading.Thread | None = None  # the upload of the last file checkpoint

    @classmethod
    def of(cls, train_cfg, env) -> RemoteRun | None:
        url = train_cfg.output_dir
        return cls(url, staging_folder(url, train_cfg.staging_dir), env) if is_remote(url) else None

    # ---- before training -----------------------------------------------------------------
    def claim(self, resume: str, overwrite: bool) -> None:
        """The remote side of :func:`vlp.train.run_folder.claim`: a fresh start never writes over
        another run's checkpoints in ``url``; ``overwrite`` deletes them (and the staging folder's)."""
        remote = complete_remote(self.store.files("checkpoints"), "") if self.env.is_main else []
        remote = all_gather_objects(remote, self.env)[0]
        if not remote and not resume and self.env.local_rank == 0:
            remove_run_files(self.staging)  # the storage is the run's truth: nothing of an old run stays staged
        if not remote or resume == "latest" or self._inside(resume):
            return
        if not overwrite:
            raise ConfigError(
                f"{self.url} already holds another run's checkpoints ({len(remote)}: {remote[0]} .. {remote[-1]}); "
                "continue that run with --resume latest, replace it with --overwrite, or choose another "
                "train.output_dir"
            )
        if self.env.is_main:  # the files run_folder.remove_run_files deletes locally
            self.store.delete([r for r in self.store.files() if r == "metrics.jsonl" or r.split("/", 1)[0] in
                               ("checkpoints", "tensorboard")])  # fmt: skip
        if self.env.local_rank == 0:
            remove_run_files(self.staging)
        barrier(self.env)

    def _inside(self, resume: str) -> bool:
        return bool(resume) and resume.rstrip("/").rsplit("/", 1)[0] == f"{self.url}/checkpoints"

    def local_resume(self, resume: str) -> str:
        """``train.resume`` for the staging folder: ``latest`` after the newest checkpoint is here
        (uploading what an earlier attempt left unsent, downloading what this machine lacks), a
        checkpoint of this run's folder downloaded into staging; another remote checkpoint, fetched."""
        if not resume:
            return resume
        if resume != "latest" and not self._inside(resume):
            return fetched(resume, self.env)
        folder = self.staging / "checkpoints"
        if self.env.is_main and resume == "latest":
            self.push()  # an earlier attempt's checkpoints that never reached the storage go first
        barrier(self.env)
        rel = (
            newest_remote(self.store, "checkpoints")
            if resume == "latest"
            else "checkpoints/" + resume.rsplit("/", 1)[1]
        )
        if rel is None:
            return resume
        local = self.staging / rel
        if self.env.local_rank == 0:
            download_checkpoint(self.store, rel, local)
            if resume == "latest":
                (folder / "latest").write_text(local.name)
        if self.env.is_main:
            self._download_others()
        barrier(self.env)
        return resume if resume == "latest" else str(local)

    def _download_others(self) -> None:
        """The run's metrics, TensorBoard files and eval results this machine lacks (a resume elsewhere)."""
        for rel, size in self.store.files().items():
            if rel.split("/", 1)[0] in SKIPPED:
                continue
            local = self.staging / rel
            if not (local.is_file() and local.stat().st_size >= size):
                self.store.get(rel, local)
            self._sent[rel] = self._stamp(local)

    # ---- while training ------------------------------------------------------------------
    def before_save(self) -> None:
        """Wait for the previous checkpoint's upload: the save about to happen may delete (retention)
        a file that upload is still sending."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def after_save(self, path: Path) -> None:
        """After checkpoint ``path`` was written on every rank: mirror it (see the module docstring).
        A file checkpoint (plain, DDP) is uploaded by a background thread while training goes on; a
        step folder, every node taking part, before this returns. A failure is logged and kept
        pending; training goes on."""
        if not path.is_dir():
            if self.env.is_main:
                self.before_save()
                self._thread = threading.Thread(target=self._sync_in_background, name="vlp-upload", daemon=True)
                self._thread.start()
            return
        ok, why = True, ""
        if self.env.local_rank == 0 and not self.env.is_main:
            try:  # this node's ranks' files; the main node uploads the marker once every node is done
                self._put_folder(path, with_marker=False)
            except StorageError as e:
                ok, why = False, str(e)
        failed = [w for good, w in all_gather_objects((ok, why), self.env) if not good]
        if self.env.is_main:
            if failed:
                self.pending = failed[0]
                log.error("checkpoint %s not uploaded: %s", path.name, failed[0])
            else:
                self.sync(quiet=False)
        barrier(self.env)

    def _sync_in_background(self) -> None:
        try:
            self.sync(quiet=False)
        except Exception as e:  # noqa: BLE001 - the thread must not die silently; the next sync retries
            self.pending = f"{type(e).__name__}: {e}"
            log.error("upload to %s failed: %s", self.url, self.pending)

    def sync(self, quiet: bool = True) -> bool:
        """Upload everything the storage lacks (main rank); False (logged) when some of it failed."""
        try:
            self.push()
            self.pending = ""
            return True
        except StorageError as e:
            self.pending = str(e)
            (log.warning if quiet else log.error)("upload to %s incomplete: %s", self.url, e)
            return False

    def push(self) -> None:
        """Complete local checkpoints the storage lacks (oldest first), ``latest``, the run's other
        files, then the remote checkpoints retention removed locally. Raises StorageError."""
        folder = self.staging / "checkpoints"
        local = _local_complete(folder)
        listed = self.store.files("checkpoints")
        remote = set(complete_remote(listed, ""))
        for path in local:
            if path.name not in remote:
                self._put_folder(path, with_marker=True) if path.is_dir() else self._put_file(path)
        pointer = folder / "latest"
        if pointer.is_file() and (folder / pointer.read_text().strip()) in local:
            self.store.put(pointer, "checkpoints/latest")
        self._put_others()
        if local:
            newest = step_of(local[-1])
            names = {p.name for p in local}
            gone = {r for r in remote if r not in names and step_of(Path(r)) < newest}
            # every object of those checkpoints (file, checksum; a folder's files), from the listing above
            self.store.delete([f"checkpoints/{rel}" for rel in listed
                               if rel.split("/", 1)[0].removesuffix(".sha256") in gone])  # fmt: skip

    def _put_file(self, path: Path) -> None:
        self.store.put(path, f"checkpoints/{path.name}")
        self.store.put(path.with_name(path.name + ".sha256"), f"checkpoints/{path.name}.sha256")

    def _put_folder(self, path: Path, with_marker: bool) -> None:
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MARKER):
            self.store.put(f, f"checkpoints/{f.relative_to(path.parent).as_posix()}")
        if with_marker:
            self.store.put(path / MARKER, f"checkpoints/{path.name}/{MARKER}")

    @staticmethod
    def _stamp(path: Path) -> tuple[int, int]:
        st = path.stat()
        return st.st_size, st.st_mtime_ns

    def _put_others(self) -> None:
        for path in sorted(self.staging.rglob("*")):
            rel = path.relative_to(self.staging).as_posix()
            if not path.is_file() or rel.split("/", 1)[0] in SKIPPED or path.name.endswith((".tmp", ".download")):
                continue
            stamp = self._stamp(path)
            if self._sent.get(rel) != stamp:
                self.store.put(path, rel)
                self._sent[rel] = stamp

    # ---- at the end ------------------------------------------------------------------------
    def finish(self) -> None:
        """The last sync (main rank): raises StorageError (one line, naming the local copy) if the
        storage still lacks part of the run after the retries."""
        self.before_save()  # the last checkpoint's upload, still running in the background
        if self.env.is_main and not self.sync(quiet=True):
            raise StorageError(
                f"the run's outputs could not all be uploaded to {self.url} ({self.pending}); they are kept in "
                f"{self.staging}: when the storage is back, run the same command with --resume latest to upload them"
            )


def fetched(resume: str, env) -> str:
    """``train.resume`` as a local path: a remote checkpoint URL is downloaded first (by local rank 0
    of each node; the other ranks then find the verified copy in the cache)."""
    if not (resume and is_remote(resume)):
        return resume
    from vlp.checkpoint.storage import fetch

    path = fetch(resume) if env.local_rank == 0 else None
    barrier(env)
    return str(path or fetch(resume))
