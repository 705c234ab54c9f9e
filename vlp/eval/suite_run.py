"""``vlp eval --suite NAME``: every dataset of a suite (:mod:`vlp.eval.suites`) in turn, one
CLIP_benchmark results file each, written as soon as it is done, so that a killed suite resumes
where it stopped (a dataset whose file exists is read, not evaluated again). A dataset that is not
there, or a task vlp cannot score, is named in one line and the suite goes on; the suite's average
is over the tasks scored and says how many that is.
"""

from __future__ import annotations

import json
from pathlib import Path

from vlp.distributed import barrier
from vlp.eval import benchmark_wds
from vlp.eval.registry import get_task
from vlp.eval.run import BENCHMARK_NAME, benchmark_keys, evaluate_tasks, format_table, write_csv
from vlp.eval.suites import load_suite, summarize


def run_suite(args, model, tokenizer, ctx, model_name: str, pretrained: str) -> list[Path]:
    """Run ``args.suite``; returns the files written. ``args.output`` must be a folder."""
    from vlp.config import ConfigError

    suite = load_suite(args.suite)
    out = Path(args.output)
    if out.suffix or "{" in args.output:
        raise ConfigError(f"--suite writes one file per dataset: --output must be a folder, got {args.output}")
    if not args.dataset_root:
        raise ConfigError("--suite needs --dataset_root (where its datasets are; {dataset} is replaced by each name)")
    main, results, lines = ctx.env.is_main, {}, []
    for t in suite.tasks:
        if t.unsupported:
            lines.append(f"not scored: {t.name} ({t.key}): needs {t.unsupported}")
            continue
        try:
            task, load = _prepare(t, args)
        except benchmark_wds.DatasetMissing as e:
            lines.append(f"skipped: {t.name} ({t.key}) is not there: {e}")
            continue
        keys = {"dataset": t.key, "model": model_name, "pretrained": pretrained, "task": task.name,
                "language": args.language}  # fmt: skip
        path = out / BENCHMARK_NAME.format(**benchmark_keys(keys))
        if path.is_file():
            results[t.key] = json.loads(path.read_text())
            lines.append(f"done before: {t.name} ({path})")
            continue
        if main:
            print(f"vlp eval: {suite.name}: {t.name} ({t.key}, {task.name})", flush=True)
        result = evaluate_tasks(model, tokenizer, [(task, load())], ctx, model_name=model_name, pretrained=pretrained)[
            0
        ]
        result.update(dataset=t.key, language=args.language)
        if main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(result, indent=2) + "\n")
            tmp.replace(path)  # complete or absent: a killed suite re-runs only what has no file
        barrier(ctx.env)
        results[t.key] = result
    summary = summarize(suite, results)
    written = []
    if main:
        for line in lines:
            print(f"vlp eval: {line}", flush=True)
        print(format_table(list(results.values())))
        scored = f"over {summary['tasks_scored']} of {summary['tasks_in_suite']} tasks"
        value = "n/a" if summary["average"] is None else f"{summary['average']:.4f}"
        print(f"vlp eval: {suite.name}: {suite.average}: {value} {scored}")
        summary_path = out / f"{suite.name}_summary.json"
        summary_path.write_text(json.dumps(summary, indent=2) + "\n")
        written = [summary_path, write_csv(list(results.values()), out / "results.csv")]
    return written


def _prepare(t, args):
    """``(task, load)`` of a suite entry; DatasetMissing when its data are not there."""
    root = args.dataset_root
    if t.dataset:
        ds = benchmark_wds.locate(t.dataset, root)
        benchmark_wds.shard_urls(ds, args.split)  # DatasetMissing before anything else is read
        task = get_task(t.task or benchmark_wds.default_task(ds))
        return task, lambda: benchmark_wds.load(ds, task.name, args.split)
    path = Path(root.format(dataset=t.data, dataset_cleaned=t.data.replace("/", "-")))
    if not path.exists():
        raise benchmark_wds.DatasetMissing(f"{path}: not found")
    task = get_task(t.task)
    options = {"images_root": args.images_root} if t.images_root and args.images_root else {}
    return task, lambda: task.load(path, **options)
