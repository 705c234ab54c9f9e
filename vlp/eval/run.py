"""Run evaluation tasks on a model: used by ``vlp eval`` and by the trainer.

Results are a list of dicts in CLIP_benchmark's shape
``{"dataset", "model", "pretrained", "task", "metrics": {...}}`` plus vlp's ``skipped`` counts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp.eval.tasks import EvalContext, get_task

log = logging.getLogger(__name__)


def build_specs(tasks, paths, *, classnames=None, templates=None, images_root=None) -> list:
    """``(task, EvalData, templates)`` for each task and its data path, read once.

    Unknown task names fail before any data is read. Zero-shot templates: ``templates`` if given,
    else those found beside the data, else ImageNet's 7 short ones.
    """
    from vlp.eval.datasets import load_eval_data, load_templates
    from vlp.eval.tasks import ALIASES

    tasks = [ALIASES.get(t, t) for t in tasks]
    for task in tasks:
        get_task(task)
    specs = []
    for task, path in zip(tasks, paths):
        kw = {}
        if task == "zeroshot_classification" and classnames:
            kw["classnames"] = classnames
        if task == "compositional" and images_root:
            kw["images_root"] = images_root
        data = load_eval_data(task, path, **kw)
        tpl = (
            load_templates(templates or data.templates or "imagenet-simple")
            if task == "zeroshot_classification"
            else None
        )
        specs.append((task, data, tpl))
    return specs


def evaluate_tasks(model, tokenizer, specs, ctx: EvalContext, *, model_name="", pretrained="") -> list[dict]:
    """``specs``: list of ``(task, EvalData, templates or None)``; every rank returns the same results."""
    was_training = model.training
    model.eval()
    results = []
    for task, data, templates in specs:
        if templates is not None:
            ctx.templates = templates
        metrics = get_task(task)(model, tokenizer, data, ctx)
        results.append(
            {
                "dataset": data.name,
                "model": model_name,
                "pretrained": pretrained,
                "task": task,
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
