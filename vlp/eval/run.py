"""Run evaluation tasks on a model: used by ``vlp eval`` and by the trainer.

Results are a list of dicts in CLIP_benchmark's shape
``{"dataset", "model", "pretrained", "task", "metrics": {...}}`` plus vlp's ``skipped`` counts.
"""

from __future__ import annotations

import json
import logging
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
    """``{"<task>/<metric>": value}`` of the scalar metrics, for logs and reports."""
    out = {}
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, (int, float)):
                out[f"{r['task']}/{k}"] = v
        for k, v in r.get("skipped", {}).items():
            out[f"{r['task']}/skipped/{k}"] = v
    return out


def format_table(results: list[dict]) -> str:
    rows = [("task", "dataset", "metric", "value")]
    for r in results:
        for k, v in r["metrics"].items():
            if isinstance(v, float):
                rows.append((r["task"], r["dataset"], k, f"{v:.4f}"))
            elif isinstance(v, int):
                rows.append((r["task"], r["dataset"], k, str(v)))
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(results: list[dict], path: str | Path) -> Path:
    """One result writes a dict (CLIP_benchmark's file shape), several a list."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = results[0] if len(results) == 1 else results
    path.write_text(json.dumps(payload, indent=2) + "\n")
    return path
