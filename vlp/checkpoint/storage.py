"""Object storage (any fsspec URL: ``s3://``, ``gs://``, ``az://``, ...) for run folders and checkpoints.

vlp writes and reads checkpoints on local disk, where atomic renames and fsync make a checkpoint
complete or absent. A remote run folder keeps those guarantees through the order of uploads (an
object store has no rename, but a PUT is atomic: an object appears whole or not at all):

- a checkpoint file goes first, its ``.sha256`` second; a step folder's files first, its
  ``vlp_complete.json`` marker second; ``latest`` last. A remote checkpoint counts as complete only
  when its checksum (file) or marker (folder) is there, and every download is checked against it;
- older checkpoints are deleted only after ``latest`` names the new one.

Every storage call is retried with exponential backoff (``VLP_STORAGE_RETRIES`` tries, default 5,
waiting ``VLP_STORAGE_BACKOFF`` seconds, default 2, doubling); after the last try a
:class:`StorageError` says in one line what failed and where the local copy is.

``file://`` URLs are plain local paths. Reading a remote checkpoint for evaluation, export or
:func:`vlp.load_model` downloads it once into ``~/.cache/vlp/remote`` (``VLP_CACHE``), verified.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from vlp.checkpoint.files import CheckpointError
from vlp.checkpoint.step_folders import MARKER

log = logging.getLogger(__name__)

T = TypeVar("T")


class StorageError(OSError):
    """A storage call that still failed after the last retry (one line: what, where, why)."""


def is_remote(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a URL of a remote filesystem (``file://`` and plain paths are local;
    ``http(s)://`` and ``hf://`` are read elsewhere: published weights, shards)."""
    s = str(path)
    if "://" not in s:
        return False
    return s.split("://", 1)[0].lower() not in ("file", "http", "https", "hf", "pipe")


def local_path(path: str | os.PathLike) -> Path:
    """A local path, with a ``file://`` prefix removed."""
    s = str(path)
    return Path(s[len("file://") :] if s.startswith("file://") else s)


def _retries() -> tuple[int, float]:
    return max(1, int(os.environ.get("VLP_STORAGE_RETRIES", "5"))), float(os.environ.get("VLP_STORAGE_BACKOFF", "2"))


def retried(what: str, call: Callable[[], T], keep: str = "") -> T:
    """``call()``, retried with exponential backoff on any error but a missing file; the last error
    becomes one :class:`StorageError` line (``keep``: where the local copy stays, said in it)."""
    tries, wait = _retries()
    for attempt in range(1, tries + 1):
        try:
            return call()
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001 - storage clients raise many kinds of transient error
            if attempt == tries:
                kept = f"; the local copy is kept in {keep}" if keep else ""
                raise StorageError(f"{what} failed after {tries} tries ({type(e).__name__}: {e}){kept}") from None
            log.warning("%s failed (%s: %s); retrying in %.1f s (try %d of %d)", what, type(e).__name__, e, wait,
                        attempt + 1, tries)  # fmt: skip
            time.sleep(wait)
            wait *= 2
    raise AssertionError("unreachable")


class Store:
    """A remote folder ``url``: put, get, list and delete below it, every call retried."""

    def __init__(self, url: str):
        try:
            import fsspec
        except ImportError:  # pragma: no cover - fsspec comes with torch/webdataset's dependencies
            raise StorageError("remote folders need fsspec: pip install fsspec") from None
        try:
            self.fs, root = fsspec.core.url_to_fs(url)
        except (ImportError, ValueError) as e:
            scheme = url.split("://", 1)[0]
            extra = {"s3": "s3fs (pip install 'vlp[cloud]')", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs"}
            need = extra.get(scheme, f"the fsspec filesystem package for {scheme}://")
            raise StorageError(f"{url}: cannot open {scheme}:// ({e}); install {need}") from None
        self.url, self.root = url.rstrip("/"), root.rstrip("/")

    def _path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def where(self, rel: str = "") -> str:
        return f"{self.url}/{rel}" if rel else self.url

    def put(self, local: Path, rel: str) -> None:
        """Upload the file ``local`` to ``rel`` (one atomic object)."""
        retried(f"upload of {local} to {self.where(rel)}", lambda: self.fs.put_file(str(local), self._path(rel)),
                keep=str(local))  # fmt: skip
        _fault_point(rel)

    def put_bytes(self, rel: str, data: bytes) -> None:
        retried(f"write of {self.where(rel)}", lambda: self.fs.pipe_file(self._path(rel), data))
        _fault_point(rel)

    def get(self, rel: str, local: Path) -> None:
        """Download ``rel`` to ``local`` (through a temporary name: ``local`` is whole or absent)."""
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(local.name + ".download")
        retried(f"download of {self.where(rel)}", lambda: self.fs.get_file(self._path(rel), str(tmp)))
        os.replace(tmp, local)

    def read_text(self, rel: str) -> str | None:
        """The text of ``rel``, or None when there is no such object."""
        try:
            return retried(f"read of {self.where(rel)}", lambda: self.fs.cat_file(self._path(rel))).decode()
        except FileNotFoundError:
            return None

    def files(self, rel: str = "") -> dict[str, int]:
        """Every object below ``rel``: its path relative to ``rel`` -> size ({} if none)."""
        self.fs.invalidate_cache()
        base = self._path(rel)

        def find() -> dict:
            try:
                return self.fs.find(base, detail=True)
            except FileNotFoundError:
                return {}

        found = retried(f"listing of {self.where(rel)}", find)
        n = len(base.rstrip("/")) + 1
        return {p[n:]: int(info.get("size") or 0) for p, info in found.items() if info.get("type") != "directory"}

    def delete(self, rels: list[str]) -> None:
        if rels:
            retried(f"delete in {self.url}", lambda: self.fs.rm([self._path(r) for r in rels]))


def _fault_point(rel: str) -> None:
    """Fault injection for the tests of a kill during an upload: ``VLP_STORAGE_KILL_AFTER=NAME``
    kills this process (SIGKILL) right after an object whose path ends in NAME is written."""
    name = os.environ.get("VLP_STORAGE_KILL_AFTER")
    if name and rel.endswith(name):
        import signal

        os.kill(os.getpid(), signal.SIGKILL)


# ---- reading a remote checkpoint --------------------------------------------------------------
def cache_root() -> Path:
    return Path(os.environ.get("VLP_CACHE") or Path.home() / ".cache" / "vlp") / "remote"


def complete_remote(files: dict[str, int], folder: str) -> list[str]:
    """The complete checkpoints in ``folder`` of a listing (``step_N.pt`` with its ``.sha256``,
    ``step_N/`` with its marker), oldest first, as paths relative to the listing."""
    from vlp.checkpoint.writing import STEP_NAME

    prefix = f"{folder}/" if folder else ""
    names = set()
    for rel in files:
        if not rel.startswith(prefix):
            continue
        parts = rel[len(prefix) :].split("/")
        if not STEP_NAME.match(parts[0]):
            continue
        file_done = len(parts) == 1 and parts[0].endswith(".pt") and rel + ".sha256" in files
        if file_done or (len(parts) == 2 and parts[1] == MARKER):
            names.add(parts[0])
    return [prefix + n for n in sorted(names)]


def newest_remote(store: Store, folder: str) -> str | None:
    """The checkpoint ``latest`` names in ``folder`` (if complete), else the newest complete one."""
    files = store.files(folder)
    complete = complete_remote({(f"{folder}/{k}" if folder else k): v for k, v in files.items()}, folder)
    pointer = store.read_text(f"{folder}/latest" if folder else "latest")
    if pointer and (named := (f"{folder}/{pointer.strip()}" if folder else pointer.strip())) in complete:
        return named
    return complete[-1] if complete else None


def download_checkpoint(store: Store, rel: str, dest: Path) -> Path:
    """Download the complete checkpoint ``rel`` (a file with its checksum, or a step folder) to
    ``dest`` (the file or folder path), verifying the file's SHA-256; ``dest``."""
    from vlp.checkpoint.writing import file_sha256

    if rel.endswith(".pt"):
        want = (store.read_text(rel + ".sha256") or "").strip()
        if dest.is_file() and want and file_sha256(dest) == want:
            return dest  # already here (an earlier download, or this machine wrote it)
        store.get(rel, dest)
        got = file_sha256(dest)
        if want and got != want:
            dest.unlink(missing_ok=True)
            raise CheckpointError(f"{store.where(rel)}: checksum mismatch after download (expected {want[:12]}..., "
                                  f"got {got[:12]}...)")  # fmt: skip
        dest.with_name(dest.name + ".sha256").write_text(want or got)
        return dest
    files = store.files(rel)
    if MARKER not in files:
        raise CheckpointError(f"{store.where(rel)}: not a complete checkpoint (no {MARKER})")
    for name, size in sorted(files.items(), key=lambda kv: kv[0] == MARKER):  # the marker last
        target = dest / name
        if not (target.is_file() and target.stat().st_size == size):
            store.get(f"{rel}/{name}", target)
    return dest


def fetch(url: str) -> Path:
    """A local copy of the checkpoint at a remote ``url``: a checkpoint file, a step folder, a
    checkpoints folder or a run folder (their ``latest``); downloaded once into :func:`cache_root`."""
    store = Store(url)
    name = url.rstrip("/").rsplit("/", 1)[-1]
    key = hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]
    dest_root = cache_root() / key
    if retried(f"lookup of {url}", lambda: store.fs.isfile(store.root)):  # a checkpoint file
        parent, leaf = url.rstrip("/").rsplit("/", 1)
        return download_checkpoint(Store(parent), leaf, dest_root / name)
    files = store.files()
    if not files:
        raise FileNotFoundError(f"checkpoint not found: {url}")
    if MARKER in files:
        return download_checkpoint(store, "", dest_root / name)
    for folder in ("checkpoints", ""):
        rel = newest_remote(store, folder)
        if rel is not None:
            return download_checkpoint(store, rel, dest_root / rel)
    raise FileNotFoundError(
        f"{url}: no complete vlp checkpoint there (a step_*.pt with its .sha256, or a step_* folder with {MARKER}, "
        "in the folder or its checkpoints/)"
    )
