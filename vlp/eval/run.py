"""Run evaluation tasks on a model: used by ``vlp eval`` and by the trainer.

Results are a list of dicts in CLIP_benchmark's shape
``{"dataset", "model", "pretrained", "task", "metrics": {...}}`` plus vlp's ``skipped`` counts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from vlp.eval.datasets import EvalData
from vlp.eval.registry import EvalContext, EvalTask, get_task, registered_tasks

log = logging.getLogger(__name__)


def build_specs(tasks, paths, **options) -> list[tuple[EvalTask, EvalData]]:
    """``(task, EvalData)`` for each task name (or alias) and its data path, the data read once.

    ``options`` (``classnames``, ``templates``, ``images_root``: the ``options`` of the tasks' entries)
    go to the loaders of the tasks that take them; empty ones are left out. Unknown task names fail
    (UnknownTaskError) before any data is read; an option no task takes raises TypeError.
    """
    unknown = set(options) - {name for task in registered_tasks().values() for name in task.options}
    if unknown:
        raise TypeError(f"build_specs: no eval task takes the option(s) {', '.join(sorted(unknown))}")
    entries = [get_task(name) for name in tasks]
    specs = []
    for task, path in zip(entries, paths):
        kw = {name: options[name] for name in task.options if options.get(name)}
        specs.append((task, task.load(path, **kw)))
    return specs


def evaluate_tasks(model, tokenizer, specs, ctx: EvalContext, *, model_name="", pretrained="") -> list[dict]:
    """``specs``: list of ``(task, EvalData)`` from :func:`build_specs`; every rank returns the same results."""
    was_training = model.training
    model.eval()
    results = []
    for task, data in specs:
        metrics = task.run(model, tokenizer, data, ctx)
        results.append(
            {
                "dataset": data.name,
                "model": model_name,
                "pretrained": pretrained,
                "task": task.name,
                "metrics": metrics,
                "skipped": dict(data.skipped),
            }
        )
    model.train(was_training)
    return results


def flat_metrics(results: list[dict]) -> dict:
    """``{"<task>/<metric>": value}`` of the scalar metrics (``<dataset>/<task>/<metric>`` for a
    CLIP_benchmark dataset by name), for logs and reports."""
    out = {}
    for r in results:
        # a dataset by name (wds/...) is keyed by it too: several share a task
        head = f"{r['dataset']}/{r['task']}" if str(r["dataset"]).startswith("wds/") else r["task"]
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)):
                out[f"{head}/{k}"] = v
        for k, v in r.get("skipped", {}).items():
            out[f"{head}/skipped/{k}"] = v
    return out


def format_table(results: list[dict]) -> str:
    """The scalar metrics of ``results`` as a markdown table (task, dataset, metric, value)."""
    rows = [("task", "dataset", "metric", "value")]
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, float):
                rows.append((r["task"], r["dataset"], k, f"{v:.4f}"))
            elif isinstance(v, int):
                rows.append((r["task"], r["dataset"], k, str(v)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")  # a markdown table
    return "\n".join(lines)


def write_results(results: list[dict], output: str | Path) -> list[Path]:
    """Write ``results`` where ``output`` says, and a ``.csv`` table beside; returns the paths written.

    - a ``.json`` file: one result as a dict (CLIP_benchmark's file), several as a list;
    - a folder (existing, or given with a trailing ``/``, or without a suffix): one CLIP_benchmark
      file per result, named as CLIP_benchmark names them (:data:`BENCHMARK_NAME`), and ``results.csv``;
    - a template with CLIP_benchmark's keys (``{dataset}``, ``{model}``, ``{pretrained}``,
      ``{pretrained_full_path}``, ``{task}``, ``{language}``): one file per result, the table beside the first.

    The per-result files are what ``clip_benchmark build`` aggregates.
    """
    text = str(output)
    if "{" in text:
        paths = [_write_json(r, Path(text.format(**benchmark_keys(r)))) for r in results]
        return [*paths, write_csv(results, paths[0].parent / "results.csv")]
    path = Path(text)
    if path.is_dir() or text.endswith(("/", os.sep)) or not path.suffix:
        paths = [_write_json(r, path / BENCHMARK_NAME.format(**benchmark_keys(r))) for r in results]
        return [*paths, write_csv(results, path / "results.csv")]
    json_path = _write_json(results[0] if len(results) == 1 else results, path)
    return [json_path, write_csv(results, path.with_suffix(".csv"))]


BENCHMARK_NAME = "{dataset}_{pretrained}_{model}_{language}_{task}.json"  # CLIP_benchmark's default --output


def benchmark_keys(result: dict) -> dict:
    """CLIP_benchmark's filename keys for one result: the dataset without ``wds/`` and with ``/`` ->
    ``_``, the pretrained file's base name (a tag as it is), the model, task and language."""
    dataset = str(result["dataset"])
    dataset = dataset[4:] if dataset.startswith("wds/") else dataset
    pretrained = str(result.get("pretrained") or "")
    is_file = os.path.isfile(pretrained)
    return {
        "dataset": dataset.replace("/", "_"),
        "model": result.get("model") or "",
        "pretrained": os.path.basename(pretrained) if is_file else pretrained,
        "pretrained_full_path": pretrained.replace("/", "_") if is_file else pretrained,
        "task": result["task"],
        "language": result.get("language", "en"),
    }


def _write_json(payload, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path


def write_csv(results: list[dict], path: Path) -> Path:
    """One row per result and scalar metric: dataset, task, model, pretrained, metric, value."""
    import csv

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["dataset", "task", "model", "pretrained", "metric", "value"])
        for r in results:
            for k, v in r["metrics"].items():
                if isinstance(v, (int, float)) and not isinstance(v, bool):
                    writer.writerow([r["dataset"], r["task"], r.get("model", ""), r.get("pretrained", ""), k, v])
    return path
