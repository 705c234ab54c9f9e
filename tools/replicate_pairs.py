"""Minimal pairs (counterfactual images, TripletCLIP-style), replicated small: the `debug` CLIP on the
shapes data, the baseline on the ordinary shards, the variant on as many images made of minimal pairs
(each scene followed by the same layout with the colours of its two groups swapped, or one shape
replaced; `vlp shards --synthetic --counterfactual-pairs`) read in order, with the minimal-pair loss
(loss.pair_weight 6). Same steps and seed. Target (issue #7): held-out compositional accuracy +10
points, checked on the mean of all three types and on that of the two attribute types (swap/replace
attribute).

    python tools/replicate_pairs.py --seeds 0 1 2    # about 15 minutes on 2 quiet CPU cores
    python tools/replicate_pairs.py --quick --json   # a smoke run, one JSON object

``--kinds`` picks the counterfactual kinds; given more than once, each is a source of its own (as
many images each), mixed 1:1, e.g. ``--kinds swap_attribute --kinds replace_object``.
``--shuffle-buffer N`` shuffles the variant's pairs through the pair-aware buffer instead of reading
them in order. ``--every-kind`` gives each scene one counterfactual of every kind of its source (a
minimal group, `vlp shards --every-kind`) instead of one drawn kind. docs/results.md records the runs
of each.
"""

import argparse
from pathlib import Path

from replicate_common import replicate

KINDS = ("swap_attribute", "replace_object")  # the two types the baseline has not solved (docs/results.md)
VARIANT = ["loss.pair_weight=6.0"]
TARGETS = {"compositional_acc": 0.10, "compositional_attribute_acc": 0.10}
SOURCE_INDEX_STRIDE = 1_000_000  # scene indices of source i start at i x this: no scene is in two sources


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--kinds",
        action="append",
        metavar="KINDS",
        help=f"comma-separated counterfactual kinds of one source of pairs (default {','.join(KINDS)}); repeat "
        "for more sources, mixed 1:1",
    )
    p.add_argument(
        "--shuffle-buffer", type=int, default=0, metavar="N", help="the variant's shuffle buffer (default 0: in order)"
    )
    p.add_argument(
        "--every-kind",
        action="store_true",
        help="minimal groups: each scene followed by one counterfactual of every kind of its source",
    )


def pair_shards(out: Path, images: int, args: argparse.Namespace) -> list[str]:
    """Write (or reuse) ``images`` images of minimal pairs per source under ``out/pairs`` (the first)
    and ``out/pairs-<i>``; the overrides that train on them."""
    from vlp import demo
    from vlp.data.shards import pair_group_size, write_synthetic_shards

    if args.shuffle_buffer < 0:
        raise SystemExit(f"--shuffle-buffer must be >= 0, got {args.shuffle_buffer}")
    sources = args.kinds or [",".join(KINDS)]
    if len(sources) * SOURCE_INDEX_STRIDE > demo.VAL_START:
        raise SystemExit(f"at most {demo.VAL_START // SOURCE_INDEX_STRIDE} --kinds sources (held-out scenes follow)")
    patterns = []
    for i, kinds in enumerate(sources):
        folder = out / ("pairs" if i == 0 else f"pairs-{i}")
        kinds = tuple(k.strip() for k in kinds.split(","))
        size = pair_group_size(kinds, args.every_kind)  # shards hold whole pairs or groups
        info = write_synthetic_shards(
            folder,
            images - images % size,
            seed=0,
            start_index=i * SOURCE_INDEX_STRIDE,
            max_samples_per_shard=demo.PER_SHARD - demo.PER_SHARD % size,
            counterfactual_pairs=kinds,
            every_kind=args.every_kind,
        )
        scenes = images // size + sum(info["skipped"].values())
        if scenes > SOURCE_INDEX_STRIDE:  # its scenes would overlap the next source's
            raise SystemExit(f"source {i} ({','.join(kinds)}) used {scenes} scene indices, over {SOURCE_INDEX_STRIDE}")
        patterns.append(str(folder / info["shards"]))
    return [f"data.train_shards={patterns}", f"data.shuffle_buffer={args.shuffle_buffer}"]


if __name__ == "__main__":
    replicate("pairs", VARIANT, TARGETS, variant_data=pair_shards, add_options=add_options)
