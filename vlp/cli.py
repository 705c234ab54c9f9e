"""The ``vlp`` command: parses arguments and dispatches; the work lives in the library."""

from __future__ import annotations

import argparse
import logging
import sys

from vlp.cli_shards import add_shards_parser, positive_int
from vlp.config import ConfigError


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train from a YAML config (torchrun: python -m vlp.train)")
    p.add_argument("--config", help="YAML config file (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set train.lr=3e-4 (repeatable)",
    )
    p.add_argument("--resume", help="`latest` or a checkpoint path (same as --set train.resume=...)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="start fresh in an output_dir that holds another run's checkpoints, deleting them (train.overwrite)",
    )
    p.add_argument(
        "--dry-run",
        nargs="?",
        const="",
        default=None,
        metavar="PLAN.json",
        help="train nothing: resolve and check the config and shard lists, print the plan (world size, global "
        "batch, steps, epochs, samples seen, warm-up, checkpoint and eval cadence, memory per device) and write it "
        "as JSON to PLAN.json (default: <train.output_dir>/plan.json); docs/recipes.md",
    )
    p.add_argument(
        "--world-size",
        type=positive_int,
        help="with --dry-run: plan for N processes (default: WORLD_SIZE, else the recipe's nodes x GPUs, else 1)",
    )
    # the DeepSpeed launcher appends --local_rank=N; the rank is read from LOCAL_RANK as well
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def _add_demo(sub) -> None:
    p = sub.add_parser("demo", help="make shapes shards, train a tiny CLIP on CPU, evaluate, report")
    p.add_argument("--out", help="output folder (default: runs/demo, with --real runs/lit)")
    p.add_argument("--steps", type=int, help="training steps (default: configs/demo.yaml)")
    p.add_argument(
        "--config",
        help="another shapes config: configs/demo_coca.yaml (CoCa; reports caption accuracy), "
        "configs/demo_albef.yaml (momentum distillation); default configs/demo.yaml",
    )
    p.add_argument(
        "--real",
        action="store_true",
        help="locked-image tuning of pretrained towers on OpenClipart, evaluated on held-out clip art and "
        "Fashion-MNIST (configs/lit_openclipart.yaml; needs the Debian data packages and .[real])",
    )
    p.add_argument("--quick", action="store_true", help="with --real: a smoke run on a few hundred images")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")


def _negative_types(text: str) -> list[str]:
    from vlp.data.negatives import check_types

    try:
        return list(check_types([t.strip() for t in text.split(",") if t.strip()]))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _add_negatives(sub) -> None:
    p = sub.add_parser("negatives", help="copy shards, adding hard-negative captions to every sample's json")
    p.add_argument(
        "--in", dest="inputs", required=True, help="shard pattern, e.g. 'data/train/data-{000000..000009}.tar'"
    )
    p.add_argument("--out", required=True, help="output folder (not the input folder); shards keep their names")
    p.add_argument(
        "--types",
        type=_negative_types,
        default="replace_object,replace_attribute,replace_relation,swap_objects,swap_attributes",
        help="comma-separated: replace_object, replace_attribute, replace_relation, swap_objects, swap_attributes, "
        "shuffle_nouns_adjectives, shuffle_all_words, shuffle_trigrams, shuffle_within_trigrams",
    )
    p.add_argument("--k", type=positive_int, default=4, help="negatives per sample (at most)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--field", default="hard_negatives", help="json field of the list of {text, type}")
    p.add_argument("--generator", choices=("rules", "lm"), default="rules")
    p.add_argument("--lm-model", help="with --generator lm: a local causal language model folder")
    p.add_argument("--lm-device", default="cpu", help="with --generator lm: cpu, cuda, cuda:1, ...")
    p.add_argument("--lm-batch-size", type=positive_int, default=16)


class _EvalHelpFormatter(argparse.HelpFormatter):
    """Names the registered eval tasks under ``--task`` when help is printed: importing the task
    modules (torch) while building the parser would slow every ``vlp`` command by seconds."""

    def _get_help_string(self, action) -> str:
        if action.dest != "task":
            return super()._get_help_string(action)
        from vlp.eval.registry import registered_tasks

        names = []
        for task in registered_tasks().values():
            notes = [f"alias {alias}" for alias in task.aliases] + ([task.note] if task.note else [])
            names.append(task.name + (f" ({'; '.join(notes)})" if notes else ""))
        return " | ".join(names).replace("%", "%%") + " (repeatable)"


def _add_eval(sub) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (torchrun: python -m vlp.eval shards the data)",
        formatter_class=_EvalHelpFormatter,
    )
    p.add_argument("--task", action="append", default=[], help="a registered eval task (repeatable)")
    p.add_argument(
        "--data", action="append", default=[], help="data of each --task, in order (one --data serves every task)"
    )
    p.add_argument(
        "--dataset",
        action="append",
        default=[],
        help="a CLIP_benchmark WebDataset by name, wds/NAME (repeatable), read from --dataset_root; the task "
        "follows from its dataset_type.txt unless --task names one (one for all, or one per --dataset)",
    )
    p.add_argument(
        "--dataset_root",
        "--dataset-root",
        help="folder, http(s):// or hf:// URL, or 'pipe:COMMAND PREFIX' of the --dataset; a template with "
        "CLIP_benchmark's keys: data/wds_{dataset_cleaned}",
    )
    p.add_argument("--split", default="test", help="split of the --dataset (its {split}/nshards.txt)")
    p.add_argument(
        "--suite",
        help="a named list of datasets with their main metrics and average (datacomp, imagenet_robustness, retrieval, "
        "compositional; vlp/eval/suite_lists/), found under --dataset_root; --output is then a folder",
    )
    p.add_argument("--language", default="en", help="recorded in the results, as CLIP_benchmark records it")
    _add_model_source(p)
    p.add_argument("--batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=int, default=2, help="image loading workers per rank")
    p.add_argument("--classnames", help="file (one per line) or 'imagenet' (default: folder names / _info.json)")
    p.add_argument("--templates", help="file with {c}, 'imagenet' (80) or 'imagenet-simple' (7)")
    p.add_argument(
        "--images-root",
        help="folder of the images a compositional, SugarCrepe(++) or Winoground file names (default: beside it)",
    )
    p.add_argument(
        "--output",
        default="results.json",
        help="a .json file (one result: CLIP_benchmark's dict; several: a list), a folder (one CLIP_benchmark "
        "file per dataset and task, named as it names them) or CLIP_benchmark's filename template "
        "({dataset}_{pretrained}_{model}_{language}_{task}.json); a results.csv table goes beside",
    )
    p.add_argument("--plots", action="store_true", help="also write PNG plots (counting confusion) beside --output")
    _add_image_options(p)
    p.add_argument("--device", default="auto")


def _add_image_options(p) -> None:
    """How images become RGB, as data.exif_transpose / data.alpha_background do in training."""
    p.add_argument(
        "--no-exif-transpose",
        dest="exif_transpose",
        action="store_false",
        help="keep images as stored instead of turning them upright by their EXIF orientation (open_clip's pixels)",
    )
    p.add_argument(
        "--alpha-background",
        default="white",
        help="colour transparent images are composited on: a name, #rrggbb or r,g,b; none drops the alpha channel",
    )


def _add_model_source(p) -> None:
    """Where ``vlp eval`` and ``vlp caption`` get the model: a checkpoint, an architecture, published weights."""
    p.add_argument("--checkpoint", default="", help="vlp checkpoint, or open_clip file / safetensors with --model")
    p.add_argument("--model", help="architecture (needed for open_clip files and tags; alone: random init)")
    _add_pretrained(p)


def _add_pretrained(p) -> None:
    p.add_argument(
        "--pretrained",
        default="",
        help="published weights: an open_clip tag of --model (openai, laion2b_s34b_b79k, ...), hf-hub:org/repo, "
        "an open_clip or Hugging Face CLIPModel folder (through the Hugging Face cache; see docs/pretrained.md)",
    )


def _add_caption(sub) -> None:
    p = sub.add_parser("caption", help="caption images with a CoCa model: prints path<TAB>caption, writes JSON")
    _add_model_source(p)
    p.add_argument("--images", required=True, help="a folder (its image files, recursively) or a glob pattern")
    p.add_argument("--strategy", choices=("greedy", "beam", "sample"), default="beam")
    p.add_argument("--max-len", type=positive_int, default=30, help="tokens after start-of-text, end-of-text included")
    p.add_argument("--min-len", type=int, default=2, help="end-of-text allowed from this many new tokens on")
    p.add_argument("--num-beams", type=positive_int, default=4)
    p.add_argument("--top-k", type=int, default=0, help="sample: keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample: nucleus probability mass (1: all)")
    p.add_argument("--temperature", type=float, default=1.0, help="sample: logits are divided by it")
    p.add_argument("--seed", type=int, default=0, help="sample: random seed")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--workers", type=int, default=2, help="image loading workers")
    p.add_argument("--output", default="captions.json", help='JSON list of {"image", "caption"}')
    _add_image_options(p)
    p.add_argument("--device", default="auto")


def _add_export(sub) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint: open_clip folder, Hugging Face CLIPModel folder or safetensors file"
    )
    p.add_argument(
        "--checkpoint",
        default="",
        help="vlp checkpoint (runs/NAME/checkpoints/step_*.pt), or an open_clip file with --model",
    )
    _add_pretrained(p)
    p.add_argument(
        "--format",
        required=True,
        choices=("open_clip", "hf", "safetensors"),
        help="open_clip: open_clip.create_model_and_transforms('local-dir:OUT'); hf: transformers CLIPModel "
        "(ViT CLIPs only); safetensors: OUT/model.safetensors with vlp's model config in its metadata",
    )
    p.add_argument("--out", required=True, help="output folder (created; a non-empty one needs --force)")
    p.add_argument("--model", help="architecture of an open_clip checkpoint file (vlp checkpoints carry theirs)")
    p.add_argument(
        "--weights",
        choices=("live", "ema"),
        default="live",
        help="live: the trained weights; ema: a training checkpoint's moving average of them (train.ema)",
    )
    p.add_argument("--force", action="store_true", help="write into a non-empty folder not made by vlp export")
    p.add_argument("--check", action="store_true", help="reload the export and print max abs differences")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlp", description="vision-language pretraining")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    _add_demo(sub)
    add_shards_parser(sub)
    _add_negatives(sub)
    _add_eval(sub)
    _add_caption(sub)
    _add_export(sub)
    return parser


def cmd_train(args) -> int:
    from vlp.config import load_config

    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if args.resume else [])
    overrides += ["train.overwrite=true"] if args.overwrite else []
    cfg = load_config(args.config, overrides)  # a config mistake is reported before torch is even imported
    if args.dry_run is not None:
        from vlp.train.plan_report import run_dry_run

        return run_dry_run(cfg, args.config, args.dry_run, args.world_size)
    if args.world_size:
        raise ConfigError("--world-size plans a run (with --dry-run); the launcher sets the world size of a run")
    from vlp.config.load import unexpanded

    if left := unexpanded(cfg):
        key, name = left[0]
        raise ConfigError(f"{key} uses ${{{name}}}, which is not set in the environment: export {name}=... or "
                          f"--set {key}=...")  # fmt: skip

    from vlp.distributed import shutdown
    from vlp.train.guards import EXIT_PREEMPTED
    from vlp.train.trainer import Trainer

    trainer = Trainer(cfg)
    try:
        summary = trainer.train()
    finally:
        shutdown(trainer.env)
    return EXIT_PREEMPTED if summary.get("preempted") else 0


def cmd_demo(args) -> int:
    if args.real:
        if args.config:
            raise ConfigError("--real runs configs/lit_openclipart.yaml; change it with --set KEY=VALUE, not --config")
        from vlp.demo_real import run_real_demo

        steps = [f"train.steps={args.steps}"] if args.steps is not None else []
        run_real_demo(args.out or "runs/lit", overrides=list(args.overrides) + steps, quick=args.quick)
        return 0
    if args.quick:
        raise ConfigError("--quick goes with --real")
    from vlp.demo import DEMO_CONFIG, run_demo

    run_demo(args.out or "runs/demo", steps=args.steps, overrides=args.overrides, config=args.config or DEMO_CONFIG)
    return 0


def cmd_shards(args) -> int:
    from vlp.cli_shards import run_shards

    return run_shards(args)


def cmd_negatives(args) -> int:
    from vlp.data.negatives_shards import write_negative_shards

    if args.generator == "lm" and not args.lm_model:
        raise ConfigError("--generator lm needs --lm-model DIR (a local causal language model folder)")
    summary = write_negative_shards(
        args.inputs,
        args.out,
        types=args.types,
        k=args.k,
        seed=args.seed,
        field=args.field,
        generator=args.generator,
        lm_model=args.lm_model,
        lm_device=args.lm_device,
        lm_batch_size=args.lm_batch_size,
    )
    written, current = len(summary["written"]), len(summary["up_to_date"])
    print(f"vlp: {written} shard(s) written, {current} up to date, {summary['num_samples']} samples in {args.out}")
    print(
        f"vlp: {summary['negatives']} negatives {summary['types']}; samples without any: {summary['without_negatives']}"
    )
    skipped = {k: v for k, v in summary["skipped"].items() if v}
    if skipped:
        print(f"vlp: bad data: {skipped} (bad samples are copied without negatives; of a damaged shard,")
        print("vlp: the samples before the damage are written)")
    print(f"vlp: summary in {args.out}/_negatives.json")
    print(f"vlp: use data.train_shards={summary['train_shards']}")
    return 0


def cmd_eval(args) -> int:
    from vlp.eval.cli import run_eval_command

    return run_eval_command(args)


def cmd_caption(args) -> int:
    from vlp.caption import run_caption_command

    return run_caption_command(args)


def cmd_export(args) -> int:
    from vlp.export import export_checkpoint

    if bool(args.checkpoint) == bool(args.pretrained):
        raise ConfigError("vlp export: give --checkpoint CKPT or --pretrained WEIGHTS (with --model for a tag)")
    info = export_checkpoint(
        args.checkpoint or args.pretrained, args.format, args.out, model_name=args.model, force=args.force,
        check=args.check, published=bool(args.pretrained), weights=args.weights,
    )  # fmt: skip
    print(f"vlp: exported {info['architecture']} ({info['source_kind']}) as {args.format} to {args.out}:")
    print(f"vlp:   {', '.join(info['files'])} (+ export.json)")
    if info.get("left_out"):
        print(f"vlp:   left out (no such module in {args.format}): {', '.join(info['left_out'])}")
    print(f"vlp: load with {info['loads_with']}")
    parity = info.get("parity")
    if parity is None:
        return 0
    diffs = ", ".join(f"{k} {v:.2e}" for k, v in parity.items() if isinstance(v, float) and k != "max_abs_diff")
    flags = ", ".join(f"{k} {v}" for k, v in parity.items() if isinstance(v, bool) and k != "ok")
    print(f"vlp: check: max abs diff {parity['max_abs_diff']:.2e} of normalised features and logit scale")
    print(f"vlp:   {diffs}; {flags}")
    if not parity["ok"]:
        print("vlp export: error: the export does not reproduce the checkpoint (see export.json)", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # other libraries log chatty INFO lines on the root logger; vlp's own INFO lines stay visible
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("vlp").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    handlers = {
        "train": cmd_train,
        "demo": cmd_demo,
        "shards": cmd_shards,
        "negatives": cmd_negatives,
        "eval": cmd_eval,
        "caption": cmd_caption,
        "export": cmd_export,
    }
    try:
        return handlers[args.command](args)
    except (ConfigError, FileNotFoundError) as e:
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        if type(e).__name__ != "StorageError":  # object storage still failing after the retries: one line
            raise
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 4
    except KeyboardInterrupt:  # Ctrl-C before training's own handler is installed (or outside training)
        print(f"vlp {args.command}: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        if type(e).__name__ != "DivergedError":  # the message names the step and the last good checkpoint
            raise
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 3
    except ImportError as e:
        if type(e).__name__ != "MissingDependencyError":  # an optional package; the message says what to install
            raise
        print(f"vlp {args.command}: error: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        # data/config problems found before work starts carry their own actionable message
        known = (
            "DataConfigError",
            "ShardError",
            "CheckpointError",
            "UnknownModelError",
            "EvalDataError",
            "UnknownTaskError",
            "GenerationError",
            "ExportError",
            "DataStopError",
            "NoUsableDataError",
        )
        if any(cls.__name__ in known for cls in type(e).__mro__):  # their subclasses too
            print(f"vlp {args.command}: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
