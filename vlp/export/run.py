"""One export: check the format fits, prepare the folder, write, optionally measure parity, record.

Each format is an adapter module with ``validate(source)`` (raises before anything is written),
``left_out(source) -> tensor names the format cannot hold`` (recorded, and logged when written),
``write(source, out) -> file names`` and ``check(source, out, batch) -> parity numbers``.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from vlp.export import hf_dir, open_clip_dir, safetensors_file
from vlp.export.errors import ExportError
from vlp.export.outdir import prepare_out_dir, write_export_json
from vlp.export.source import ExportSource, load_published, load_source

log = logging.getLogger(__name__)
FORMATS = {"open_clip": open_clip_dir, "hf": hf_dir, "safetensors": safetensors_file}
LOADS_WITH = {
    "open_clip": "open_clip.create_model_and_transforms('local-dir:{out}')",
    "hf": "transformers.CLIPModel.from_pretrained('{out}'), CLIPProcessor.from_pretrained('{out}')",
    "safetensors": "vlp.export.load_safetensors('{out}/model.safetensors')",
}


def export_model(source: ExportSource, fmt: str, out: str | Path, *, force: bool = False, check: bool = False) -> dict:
    """Export ``source`` as ``fmt`` into the folder ``out``; returns what ``export.json`` records.

    Raises ExportError (unknown format, an architecture the format cannot hold, an output folder
    that is not safe to write into) before anything is written.
    """
    if fmt not in FORMATS:
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    adapter = FORMATS[fmt]
    adapter.validate(source)
    out = prepare_out_dir(out, force)
    info = {
        "format": fmt,
        "source": str(source.path),
        "source_kind": source.kind,
        "architecture": source.name,
        "weights": source.weights,
        "loads_with": LOADS_WITH[fmt].format(out=out),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    write_export_json(out, {**info, "complete": False})
    files = adapter.write(source, out)
    info["files"] = files
    if adapter.left_out(source):
        info["left_out"] = adapter.left_out(source)
    if check:
        from vlp.export.parity import parity_batch

        info["parity"] = adapter.check(source, out, parity_batch(source))
    write_export_json(out, {**info, "complete": True})
    log.debug("exported %s as %s to %s", source.path, fmt, out)
    return info


def export_checkpoint(
    checkpoint: str | Path,
    fmt: str,
    out: str | Path,
    *,
    model_name: str | None = None,
    force: bool = False,
    check: bool = False,
    published: bool = False,
    weights: str = "live",
) -> dict:
    """``vlp export``: :func:`load_source` (``published``: :func:`load_published`, ``checkpoint``
    being a pretrained value) then :func:`export_model`; see them for what is raised. ``weights``:
    ``live`` or ``ema`` (a training checkpoint's ``train.ema`` average, in every format)."""
    if fmt not in FORMATS:  # before the (possibly large) checkpoint is read
        raise ExportError(f"unknown export format '{fmt}'; choose one of {', '.join(FORMATS)}")
    if published and weights != "live":
        raise ExportError(f"--weights {weights}: published weights have no EMA; it is a training checkpoint's")
    source = load_published(checkpoint, model_name) if published else load_source(checkpoint, model_name, weights)
    return export_model(source, fmt, out, force=force, check=check)
