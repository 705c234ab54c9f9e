"""``vlp eval``: load a model and the task data, run the tasks (sharded over ranks), report."""

from __future__ import annotations

from pathlib import Path

from vlp.config import TrainConfig
from vlp.eval.run import evaluate_tasks, format_table, write_results
from vlp.eval.tasks import ALIASES, EvalContext, get_task
from vlp.train import backends


def _specs(args) -> list:
    from vlp.eval.datasets import load_eval_data, load_templates

    if len(args.data) not in (1, len(args.task)):
        raise ValueError(f"give one --data, or one per --task ({len(args.task)}); got {len(args.data)}")
    specs = []
    for i, task in enumerate(args.task):
        task = ALIASES.get(task, task)
        get_task(task)  # unknown names fail before any data is read
        path = args.data[i] if len(args.data) > 1 else args.data[0]
        kw = {}
        if task == "zeroshot_classification" and args.classnames:
            kw["classnames"] = args.classnames
        if task == "compositional" and args.images_root:
            kw["images_root"] = args.images_root
        data = load_eval_data(task, path, **kw)
        templates = None
        if task == "zeroshot_classification":
            templates = load_templates(args.templates or data.templates or "imagenet-simple")
        specs.append((task, data, templates))
    return specs


def run_eval_command(args) -> int:
    import vlp

    env = backends.init_distributed(TrainConfig(device=args.device))
    try:
        specs = _specs(args)
        model, preprocess, tokenizer = vlp.load_model(args.checkpoint or args.model, args.model, device=env.device)
        out = Path(args.output)
        ctx = EvalContext(
            env=env,
            preprocess=preprocess,
            batch_size=args.batch_size,
            workers=args.workers,
            plots_dir=out.parent if args.plots else None,
        )
        name = args.model or ("vlp checkpoint" if args.checkpoint else "")
        results = evaluate_tasks(model, tokenizer, specs, ctx, model_name=name, pretrained=args.checkpoint)
        if env.is_main:
            print(format_table(results))
            print(f"vlp eval: results in {write_results(results, out)}")
    finally:
        backends.shutdown(env)
    return 0
