"""``vlp eval``: load a model and the task data, run the tasks (sharded over ranks), report."""

from __future__ import annotations

from pathlib import Path

from vlp.config import ConfigError
from vlp.data.images import ImagePolicy
from vlp.distributed import barrier, init_process, shutdown
from vlp.eval.datasets import MAX_IMAGE_PIXELS
from vlp.eval.registry import EvalContext
from vlp.eval.run import build_specs, evaluate_tasks, format_table, write_results


def _specs(args) -> list:
    if len(args.data) not in (1, len(args.task)):
        raise ValueError(f"give one --data, or one per --task ({len(args.task)}); got {len(args.data)}")
    paths = args.data if len(args.data) > 1 else args.data * len(args.task)
    return build_specs(
        args.task, paths, classnames=args.classnames, templates=args.templates, images_root=args.images_root
    )


def image_policy_of(args) -> ImagePolicy:
    """``--no-exif-transpose`` / ``--alpha-background`` as an ImagePolicy; ConfigError for a bad colour."""
    try:
        return ImagePolicy.from_options(args.exif_transpose, args.alpha_background, MAX_IMAGE_PIXELS)
    except ValueError as e:
        raise ConfigError(f"--alpha-background: {e}") from None


def run_eval_command(args) -> int:
    from vlp.api import load_model

    policy = image_policy_of(args)  # an option mistake stops before any data or model is read
    env = init_process(args.device)
    try:
        specs = _specs(args)
        model, preprocess, tokenizer = load_model(args.checkpoint or args.model, args.model, device=env.device)
        out = Path(args.output)
        ctx = EvalContext(
            env=env,
            preprocess=preprocess,
            batch_size=args.batch_size,
            workers=args.workers,
            plots_dir=out.parent if args.plots else None,
            image_policy=policy,
        )
        name = args.model or ("vlp checkpoint" if args.checkpoint else "")
        results = evaluate_tasks(model, tokenizer, specs, ctx, model_name=name, pretrained=args.checkpoint)
        if env.is_main:
            print(format_table(results))
            print(f"vlp eval: results in {write_results(results, out)}")
        barrier(env)  # every rank done talking before any closes its connections
    finally:
        shutdown(env)
    return 0
