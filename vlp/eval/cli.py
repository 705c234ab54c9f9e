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
    if args.suite:
        if args.dataset or args.data or args.task:
            raise ConfigError("--suite runs its own datasets: give it without --dataset, --task or --data")
        return []
    if args.dataset:
        return _dataset_specs(args)
    if not args.task or not args.data:
        raise ConfigError("give --task TASK --data PATH (repeatable), or --dataset wds/NAME --dataset_root ROOT")
    if len(args.data) not in (1, len(args.task)):
        raise ValueError(f"give one --data, or one per --task ({len(args.task)}); got {len(args.data)}")
    paths = args.data if len(args.data) > 1 else args.data * len(args.task)
    return build_specs(
        args.task, paths, classnames=args.classnames, templates=args.templates, images_root=args.images_root
    )


def _dataset_specs(args) -> list:
    """``(task, EvalData)`` per ``--dataset`` (CLIP_benchmark's layout, :mod:`vlp.eval.benchmark_wds`)."""
    from vlp.eval import benchmark_wds
    from vlp.eval.registry import get_task

    if args.data:
        raise ConfigError("--data goes with --task; a --dataset is found under --dataset_root")
    if not args.dataset_root:
        raise ConfigError("--dataset needs --dataset_root (a folder or URL; {dataset} is replaced by the name)")
    if len(args.task) not in (0, 1, len(args.dataset)):
        raise ConfigError(f"give no --task, one, or one per --dataset ({len(args.dataset)}); got {len(args.task)}")
    specs = []
    for i, name in enumerate(args.dataset):
        ds = benchmark_wds.locate(name, args.dataset_root)
        wanted = args.task[i] if len(args.task) > 1 else args.task[0] if args.task else None
        task = get_task(wanted) if wanted else get_task(benchmark_wds.default_task(ds))
        data = benchmark_wds.load(ds, task.name, args.split, classnames=args.classnames, templates=args.templates)
        specs.append((task, data))
    return specs


def image_policy_of(args) -> ImagePolicy:
    """``--no-exif-transpose`` / ``--alpha-background`` as an ImagePolicy; ConfigError for a bad colour."""
    try:
        return ImagePolicy.from_options(args.exif_transpose, args.alpha_background, MAX_IMAGE_PIXELS)
    except ValueError as e:
        raise ConfigError(f"--alpha-background: {e}") from None


def describe_loaded(model, args) -> str:
    """``model ViT-B-32-quickgelu from pretrained 'openai'; images: 224 px, mean ...`` for the start-up line."""
    from vlp.models.pretrained import describe_preprocess
    from vlp.models.registry import preprocess_of

    source = f"checkpoint {args.checkpoint}" if args.checkpoint else f"pretrained '{args.pretrained}'"
    what = (
        f"{args.model or ''} from {source}".strip()
        if args.checkpoint or args.pretrained
        else f"{args.model}, random init"
    )
    return f"model {what}; images: {describe_preprocess(preprocess_of(model))}"


def check_sources(args) -> None:
    """One of --checkpoint / --pretrained / --model, and not a checkpoint with published weights."""
    if args.checkpoint and args.pretrained:
        raise ConfigError("give --checkpoint (trained weights) or --pretrained (published weights), not both")
    if not (args.checkpoint or args.pretrained or args.model):
        raise ConfigError("give --checkpoint CKPT, --pretrained WEIGHTS (with --model for a tag) or --model NAME")


def run_eval_command(args) -> int:
    from vlp.api import load_model

    check_sources(args)
    policy = image_policy_of(args)  # an option mistake stops before any data or model is read
    env = init_process(args.device)
    try:
        specs = _specs(args)
        model, preprocess, tokenizer = load_model(
            args.checkpoint or args.model or args.pretrained, args.model, device=env.device,
            pretrained=None if args.checkpoint else args.pretrained or None,
        )  # fmt: skip
        if env.is_main:
            print(f"vlp eval: {describe_loaded(model, args)}", flush=True)
        # where plots go: a results folder itself, else the folder of the file or template
        out = Path(args.output).parent if "{" in args.output or Path(args.output).suffix else Path(args.output)
        ctx = EvalContext(
            env=env,
            preprocess=preprocess,
            batch_size=args.batch_size,
            workers=args.workers,
            plots_dir=out if args.plots else None,
            image_policy=policy,
        )
        name = args.model or ("vlp checkpoint" if args.checkpoint else "")
        source = args.checkpoint or args.pretrained
        if args.suite:
            from vlp.eval.suite_run import run_suite

            written = run_suite(args, model, tokenizer, ctx, name, source)
            if env.is_main:
                print(f"vlp eval: results in {args.output} ({', '.join(str(p) for p in written)})")
            barrier(env)
            return 0
        results = evaluate_tasks(model, tokenizer, specs, ctx, model_name=name, pretrained=source)
        for r in results:
            r["language"] = args.language
        if env.is_main:
            print(format_table(results))
            written = write_results(results, args.output)
            print(f"vlp eval: results in {', '.join(str(p) for p in written)}")
        barrier(env)  # every rank done talking before any closes its connections
    finally:
        shutdown(env)
    return 0
