"""Evaluation data by name for a training run (``eval.datasets``): CLIP_benchmark datasets
(``wds/NAME``) and suites (``suite/NAME``, every scorable dataset of the suite) found under
``eval.dataset_root``; see :mod:`vlp.eval.benchmark_wds` and :mod:`vlp.eval.suites`."""

from __future__ import annotations

import dataclasses
import logging
from types import SimpleNamespace

from vlp.eval import benchmark_wds
from vlp.eval.datasets import EvalDataError
from vlp.eval.registry import get_task
from vlp.eval.suites import Suite, load_suite, summarize

log = logging.getLogger(__name__)
SUITE_PREFIX = "suite/"


def named_specs(names: list[str], root: str, split: str = "test") -> tuple[list, list[Suite]]:
    """``([(task, EvalData)], suites)`` for ``names``. A dataset named on its own must be there
    (DatasetMissing otherwise: the run stops before training); a suite's missing datasets are
    logged and skipped, as ``vlp eval --suite`` does."""
    from vlp.eval.suite_run import _prepare

    if names and not root:
        raise EvalDataError("eval.datasets needs eval.dataset_root (a folder or URL template with {dataset})")
    specs, suites = [], []
    for name in names:
        if name.startswith(SUITE_PREFIX):
            suite = load_suite(name[len(SUITE_PREFIX) :])
            suites.append(suite)
            args = SimpleNamespace(dataset_root=root, split=split, images_root=None)
            for t in suite.tasks:
                if t.unsupported:
                    log.warning("eval suite %s: %s (%s) not scored: needs %s", suite.name, t.name, t.key, t.unsupported)
                    continue
                try:
                    task, load = _prepare(t, args)
                except benchmark_wds.DatasetMissing as e:
                    log.warning("eval suite %s: %s skipped: %s", suite.name, t.key, e)
                    continue
                specs.append((task, dataclasses.replace(load(), name=t.key)))
            continue
        ds = benchmark_wds.locate(name, root)
        task = get_task(benchmark_wds.default_task(ds))
        specs.append((task, benchmark_wds.load(ds, task.name, split)))
    return specs, suites


def suite_averages(suites: list[Suite], results: list[dict]) -> dict:
    """``{"suite/<name>/average": value}`` of each suite over the results it has."""
    by_dataset = {r["dataset"]: r for r in results}
    out = {}
    for suite in suites:
        summary = summarize(suite, by_dataset)
        if summary["average"] is not None:
            out[f"suite/{suite.name}/average"] = summary["average"]
            out[f"suite/{suite.name}/tasks_scored"] = summary["tasks_scored"]
    return out
