"""Benchmark suites as data: ``vlp/eval/suite_lists/NAME.yaml`` lists datasets, each with its task
and main metric, and how the suite averages them (``datacomp``: DataComp's 38 tasks and average).

An entry names a CLIP_benchmark dataset (``dataset: wds/NAME``, found under ``--dataset_root``) or a
file layout (``data: NAME``, found at ``--dataset_root`` with ``{dataset}`` = NAME). ``unsupported``
marks a task whose metric needs code vlp does not have; the suite names it and leaves it out of the
average. :func:`main_value` reads an entry's main metric from a result (``mean_recall@1`` is the mean
of R@1 both ways, as DataComp computes it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from vlp.eval.datasets import EvalDataError

SUITE_DIR = Path(__file__).resolve().parent / "suite_lists"


@dataclass(frozen=True)
class SuiteTask:
    name: str
    main_metric: str
    dataset: str = ""  # wds/NAME: CLIP_benchmark's layout under --dataset_root
    data: str = ""  # a file layout at --dataset_root with {dataset} = data
    task: str = ""  # '' = from the dataset's type
    images_root: bool = False  # give the task --images-root
    unsupported: str = ""  # why vlp cannot score it ('' = it can)

    @property
    def key(self) -> str:
        """The dataset name results carry (CLIP_benchmark's for wds datasets)."""
        return self.dataset or self.data


@dataclass(frozen=True)
class Suite:
    name: str
    average: str
    tasks: tuple[SuiteTask, ...]


def list_suites() -> list[str]:
    return sorted(p.stem for p in SUITE_DIR.glob("*.yaml"))


def load_suite(name: str) -> Suite:
    """A suite by name (or a YAML file of the same shape); EvalDataError listing the suites."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else SUITE_DIR / f"{name}.yaml"
    if not path.is_file():
        raise EvalDataError(f"unknown suite '{name}'; suites: {', '.join(list_suites())} (or a .yaml file)")
    raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    fields = set(SuiteTask.__dataclass_fields__)
    tasks = []
    for i, entry in enumerate(raw.get("tasks") or []):
        where = f"{path}: tasks[{i}]"
        if not isinstance(entry, dict) or set(entry) - fields or not entry.get("name") or not entry.get("main_metric"):
            raise EvalDataError(f"{where}: expected name, main_metric and dataset or data (keys: {sorted(fields)})")
        if bool(entry.get("dataset")) == bool(entry.get("data")):
            raise EvalDataError(f"{where}: give one of dataset (wds/NAME) or data")
        tasks.append(SuiteTask(**{k: (str(v) if k != "images_root" else bool(v)) for k, v in entry.items()}))
    if not tasks:
        raise EvalDataError(f"{path}: no tasks")
    return Suite(str(raw.get("name") or path.stem), str(raw.get("average") or "mean of the main metrics"), tuple(tasks))


def main_value(metrics: dict, main_metric: str) -> float | None:
    """The entry's main metric from a result's metrics (None when absent or not a number)."""
    if main_metric == "mean_recall@1":
        parts = [metrics.get("image_retrieval_recall@1"), metrics.get("text_retrieval_recall@1")]
        return sum(parts) / 2 if all(isinstance(p, (int, float)) for p in parts) else None
    value = metrics.get(main_metric)
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def summarize(suite: Suite, results: dict[str, dict]) -> dict:
    """Per task: its main metric's value (or why there is none); the suite's average over the tasks
    scored, with how many of the suite's tasks that is."""
    rows, values = [], []
    for t in suite.tasks:
        result = results.get(t.key)
        value = main_value(result["metrics"], t.main_metric) if result else None
        status = "unsupported" if t.unsupported else "scored" if value is not None else "missing"
        if value is not None and math.isfinite(value):
            values.append(value)
        rows.append({"dataset": t.key, "name": t.name, "main_metric": t.main_metric, "value": value, "status": status})
    average = sum(values) / len(values) if values else None
    return {"suite": suite.name, "average_name": suite.average, "average": average, "tasks_scored": len(values),
            "tasks_in_suite": len(suite.tasks), "tasks": rows}  # fmt: skip
