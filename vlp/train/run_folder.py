"""Who owns a run folder: a fresh run never writes over another run's checkpoints.

``train.output_dir`` belongs to one run. A run that starts fresh (no ``train.resume``) in a folder
that already holds checkpoints would mix two runs: its retention would delete the other run's
files (or the other's higher step numbers would get its own deleted), ``latest`` would point
across runs, and a later ``--resume latest`` would continue the wrong one. So such a start is
refused with one line, unless the user says which they mean:

- ``--resume latest`` (``train.resume=latest``): continue the run in the folder;
- ``train.resume=<a checkpoint in this folder>``: go on from that one (its later checkpoints are
  replaced as the run passes their steps);
- ``--overwrite`` (``train.overwrite=true``): delete the folder's checkpoints, ``metrics.jsonl``
  and TensorBoard files first, and start a new run there.

A run started from a checkpoint of *another* folder (fine-tuning) needs an empty folder too.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from vlp.checkpoint.writing import STEP_NAME, step_of
from vlp.config import ConfigError

_LEFTOVERS = re.compile(r"^(step_\d{8}\.pt(\.sha256)?(\.tmp)?|step_\d{8}|latest(\.tmp)?)$")


def existing_checkpoints(folder: Path) -> list[Path]:
    """Checkpoints in ``folder`` (vlp ``step_N.pt`` files and DeepSpeed ``step_N`` folders), oldest first."""
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if STEP_NAME.match(p.name)), key=step_of)


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().parent == folder.resolve()
    except OSError:
        return False


def claim(out_dir: Path, resume: str, overwrite: bool, is_main: bool) -> None:
    """Check that this run may write to ``out_dir`` (see the module docstring); with ``overwrite``
    the main rank deletes what an earlier run left there. Raises ConfigError (one line)."""
    folder = out_dir / "checkpoints"
    found = existing_checkpoints(folder)
    if not found:
        return
    if resume == "latest" or (resume and _inside(resume, folder)):
        return  # continuing this folder's own run
    if not overwrite:
        span = found[0].name if len(found) == 1 else f"{found[0].name} .. {found[-1].name}"
        raise ConfigError(
            f"{out_dir} already holds another run's checkpoints ({len(found)}: {span}); continue that run with "
            "--resume latest, replace it with --overwrite (deletes its checkpoints and metrics), or choose another "
            "train.output_dir"
        )
    if is_main:
        remove_run_files(out_dir)


def remove_run_files(out_dir: Path) -> None:
    """Delete the checkpoints, ``latest``, ``metrics.jsonl`` and TensorBoard files of an earlier run;
    nothing else in the folder is touched."""
    folder = out_dir / "checkpoints"
    if folder.is_dir():
        for p in folder.iterdir():
            if _LEFTOVERS.match(p.name):
                shutil.rmtree(p) if p.is_dir() else p.unlink()
    (out_dir / "metrics.jsonl").unlink(missing_ok=True)
    shutil.rmtree(out_dir / "tensorboard", ignore_errors=True)


def config_changes(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """``key: old -> new`` for every config value that differs (ignoring train.resume and overwrite)."""
    out = []
    for key in sorted(set(saved) | set(current)):
        name = f"{prefix}{key}"
        if name in ("train.resume", "train.overwrite"):
            continue
        a, b = saved.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


def check_writable(folder: Path, need_bytes: int = 0) -> None:
    """Fail now, not at the first checkpoint hours later, if ``folder`` cannot take a checkpoint:
    not creatable, not writable, or less free space than ``need_bytes``."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / ".vlp_write_probe"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise OSError(f"output folder {folder} is not writable ({e.strerror or e}); set train.output_dir") from None
    free = shutil.disk_usage(folder).free
    if free < need_bytes:
        raise OSError(
            f"output folder {folder} has {free / 2**30:.2f} GiB free, but a checkpoint needs about "
            f"{need_bytes / 2**30:.2f} GiB (two must fit while the newer one is written); free space or "
            "set train.output_dir elsewhere"
        )


def check_space(out_dir: Path, model, with_teacher: bool, with_ema: bool = False) -> None:
    """ConfigError now, not at the first checkpoint hours later, if ``out_dir`` cannot take two
    checkpoints (weights, two AdamW moments, a teacher copy and the weight EMA in fp32; two coexist
    during a save)."""
    n = sum(p.numel() for p in model.parameters())
    try:
        check_writable(out_dir / "checkpoints", 2 * 4 * n * (3 + with_teacher + with_ema))
    except OSError as e:
        raise ConfigError(str(e)) from None
