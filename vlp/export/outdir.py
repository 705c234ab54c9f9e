"""The output folder of an export: created if missing, never written over by surprise.

A folder is safe to write into when it is new, empty, or holds an ``export.json`` from an earlier
``vlp export`` (its listed files are removed first, so a folder never mixes two exports). Anything
else needs ``force``, and even then only the export's own file names are replaced. ``export.json``
is written first with ``"complete": false`` and rewritten at the end: a folder whose export was
interrupted says so.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlp.export.errors import ExportError

EXPORT_JSON = "export.json"
TOOL = "vlp export"


def previous_export(out: Path) -> dict | None:
    """The ``export.json`` of an earlier vlp export in ``out``, or None."""
    try:
        info = json.loads((out / EXPORT_JSON).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return info if isinstance(info, dict) and info.get("tool") == TOOL else None


def prepare_out_dir(out: str | Path, force: bool = False) -> Path:
    """Create ``out`` or make an earlier vlp export in it writable; raises ExportError otherwise."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ExportError(f"--out {out} is a file; expected a folder (it is created if missing)")
    if out.is_dir() and any(out.iterdir()):
        previous = previous_export(out)
        if previous is None and not force:
            raise ExportError(
                f"--out {out} is not empty and was not written by vlp export (no {EXPORT_JSON}); "
                "choose a new or empty folder, or pass --force to write the export's files into it"
            )
        for name in (previous or {}).get("files", []):
            # names only: an edited export.json must not reach outside the folder
            if isinstance(name, str) and Path(name).name == name and name != EXPORT_JSON:
                (out / name).unlink(missing_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    return out


def write_export_json(out: Path, info: dict) -> Path:
    """Write ``info`` (tool name added) as ``out/export.json``, replacing it atomically."""
    path = out / EXPORT_JSON
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"tool": TOOL, **info}, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
    return path
