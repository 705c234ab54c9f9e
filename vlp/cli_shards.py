"""`vlp shards`: its arguments and what it runs (captions files, synthetic shapes, eval layouts,
installed datasets); every output problem ends as one line naming --out."""

from __future__ import annotations

import argparse
import sys


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_shards_parser(sub) -> None:
    """The `vlp shards` subcommand's arguments."""
    p = sub.add_parser("shards", help="write WebDataset shards from a captions file or the shapes generator")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--synthetic", action="store_true", help="generate the synthetic shapes data")
    src.add_argument("--captions", help="JSONL, CSV or TSV file: image path + caption [+ extra fields]")
    src.add_argument(
        "--from",
        dest="from_source",
        choices=("openclipart", "fashion-mnist"),
        help="convert an installed dataset: OpenClipart SVGs -> train/val/heldout shards; "
        "Fashion-MNIST -> train/test class folders",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-samples-per-shard", type=positive_int, default=1000)
    p.add_argument("--prefix", help="shard file prefix (default: shapes / data)")
    g = p.add_argument_group("synthetic")
    g.add_argument("--num-samples", type=int, default=10000)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--start-index", type=int, default=0, help="first sample index (held-out splits use another range)")
    g.add_argument("--image-size", type=int, default=64)
    g.add_argument("--single-group", action="store_true", help="one object group per image (zero-shot split)")
    g.add_argument(
        "--counterfactual-pairs",
        metavar="KINDS",
        default="",
        help="comma-separated swap_attribute,replace_attribute,replace_object: each scene is followed by its "
        "counterfactual (the same layout with one change), a minimal pair for loss.pair_weight",
    )
    g.add_argument(
        "--every-kind",
        action="store_true",
        help="with --counterfactual-pairs: follow each scene by one counterfactual of every kind listed (a minimal "
        "group) instead of one drawn kind; scenes where a kind does not apply are skipped",
    )
    g.add_argument(
        "--eval-layouts",
        action="store_true",
        help="instead of shards, write held-out benchmarks in every `vlp eval` layout (classification folder, "
        "retrieval/compositional/counting JSONL) from --num-samples scenes each",
    )
    g = p.add_argument_group("captions file")
    g.add_argument("--images-root", help="folder image paths are relative to (default: the captions file's)")
    g.add_argument("--image-key", default="image")
    g.add_argument("--caption-key", default="caption")
    g.add_argument("--allow-outside-root", action="store_true", help="accept image paths outside --images-root")
    g.add_argument("--encoding", default="utf-8", help="of the captions file, e.g. cp1252 (a byte-order mark decides)")
    g.add_argument(
        "--extra-fields",
        choices=("skip", "join"),
        default="skip",
        help="CSV/TSV rows with more cells than the header (an unquoted delimiter in the caption): skip and count "
        "them, or join the cells back onto the caption (the caption must be the last column)",
    )
    g.add_argument(
        "--quoting",
        choices=("csv", "none"),
        default="csv",
        help='CSV/TSV quoting: csv (a field opening with " is quoted; malformed quoting stops with the line) or '
        "none (the file uses no quoting: quotes are part of the caption)",
    )
    g.add_argument("--model", default="ViT-B-32", help="architecture whose text context long captions are counted for")
    g = p.add_argument_group("--from openclipart | fashion-mnist (also --seed, --max-samples-per-shard)")
    g.add_argument("--source", help="dataset folder (default: the Debian package's)")
    g.add_argument("--size", type=positive_int, default=224, help="openclipart: image side in pixels")
    g.add_argument("--heldout-titles", type=int, default=500, help="openclipart: titles held out for evaluation")
    g.add_argument("--val-titles", type=int, default=300, help="openclipart: titles for validation")
    g.add_argument("--limit", type=int, default=0, help="openclipart: convert only the first N SVGs (0 = all)")
    g.add_argument("--workers", type=positive_int, default=2, help="openclipart: rasterising processes")
    g.add_argument("--per-class-train", type=int, default=0, help="fashion-mnist: images per class (0 = all)")
    g.add_argument("--per-class-test", type=int, default=0, help="fashion-mnist: images per class (0 = all)")


def _tokenizer(model: str):
    """The tokenizer that counts long captions for ``--model``; ShardError (one line) if it cannot load."""
    from vlp.data.shards import ShardError
    from vlp.models.tokenizer import get_tokenizer

    try:
        return get_tokenizer(model)
    except (OSError, ValueError) as e:
        raise ShardError(f"--model {model}: cannot load its tokenizer to count long captions ({e})") from None


def run_shards(args) -> int:
    from vlp.data import shards

    try:
        return _write_shards(args)
    except OSError as e:
        if (message := shards.unwritable_output(e, args.out)) is None:
            raise  # an input's error (a missing --source) keeps its own message
        print(f"vlp shards: error: {message}", file=sys.stderr)
        return 2


def _write_shards(args) -> int:
    from vlp.data import caption_files, shards

    if args.from_source:
        return _shards_from_source(args)
    if args.synthetic and args.eval_layouts:
        from vlp.eval.synthetic_layouts import export_eval_layouts, layout_summary

        print(f"vlp: {layout_summary(args.out, args.num_samples)}", flush=True)
        paths = export_eval_layouts(args.out, num_images=args.num_samples, seed=args.seed, image_size=args.image_size)
        for task, path in paths.items():
            print(f"vlp: {task}: vlp eval --task {task} --data {path}")
        return 0
    if args.synthetic:
        try:
            info = shards.write_synthetic_shards(
                args.out,
                args.num_samples,
                seed=args.seed,
                start_index=args.start_index,
                image_size=args.image_size,
                single_group=args.single_group,
                max_samples_per_shard=args.max_samples_per_shard,
                prefix=args.prefix or "shapes",
                counterfactual_pairs=tuple(k for k in args.counterfactual_pairs.split(",") if k),
                every_kind=args.every_kind,
            )
        except ValueError as e:  # the arguments: the message names which and what is expected
            print(f"vlp shards: error: {e}", file=sys.stderr)
            return 2
    else:
        info = caption_files.write_caption_shards(
            args.captions,
            args.out,
            images_root=args.images_root,
            image_key=args.image_key,
            caption_key=args.caption_key,
            encoding=args.encoding,
            extra_fields=args.extra_fields,
            quoting=args.quoting,
            tokenizer=_tokenizer(args.model),
            model=args.model,
            max_samples_per_shard=args.max_samples_per_shard,
            prefix=args.prefix or "data",
            allow_outside_root=args.allow_outside_root,
        )
    print(f"vlp: wrote {info['num_samples']} samples in {info['num_shards']} shard(s) to {args.out}")
    print(f"vlp: use data.train_shards={args.out}/{info['shards']}")
    skipped = {k: v for k, v in info.get("skipped", {}).items() if v}
    lines = caption_files.report_lines(info) if args.captions else [f"skipped rows: {skipped}"] if skipped else []
    for line in lines:
        print(f"vlp: {line}")
    return 0


def _shards_from_source(args) -> int:
    """`vlp shards --from openclipart|fashion-mnist`: convert, then print where everything went."""
    from vlp.data.sources import fashion_mnist, openclipart

    if args.from_source == "fashion-mnist":
        source = args.source or fashion_mnist.DEFAULT_SOURCE
        info = fashion_mnist.write_fashion_mnist(args.out, source, args.per_class_train, args.per_class_test, args.seed)
        sizes = ", ".join(f"{split} {n}" for split, n in info["num_images"].items())
        print(f"vlp: Fashion-MNIST in {args.out}: {sizes} images in {len(info['classnames'])} class folders")
        print(f"vlp: vlp eval --task zeroshot_classification --data {args.out}/test")
        return 0
    try:
        infos = openclipart.write_openclipart_shards(
            args.out,
            args.source or openclipart.DEFAULT_SOURCE,
            size=args.size,
            heldout_titles=args.heldout_titles,
            val_titles=args.val_titles,
            limit=args.limit,
            max_per_shard=args.max_samples_per_shard,
            workers=args.workers,
            seed=args.seed,
        )
    except ImportError as e:  # cairosvg missing: the message says what to install
        print(f"vlp shards: error: {e}", file=sys.stderr)
        return 2
    print(f"vlp: OpenClipart in {args.out}: " + ", ".join(f"{s} {i['num_samples']}" for s, i in infos.items()))
    for split, info in infos.items():
        print(f"vlp: {split}: {args.out}/{split}/{info['shards']}" if info["num_shards"] else f"vlp: {split}: empty")
    skipped = {k: v for k, v in infos["train"]["skipped"].items() if v}
    if skipped:
        print(f"vlp: skipped SVGs: {skipped}")
    return 0
