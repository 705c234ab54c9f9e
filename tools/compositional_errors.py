"""Where a CLIP's compositional errors on the shapes data lie (issue #7, docs/results.md).

The held-out compositional test of `vlp demo` asks, per image, whether the positive caption scores
above one negative: a colour swap between the two groups, a colour replaced, a shape replaced, or
(on scenes of its own) the two groups' sizes swapped. This script rebuilds those scenes from (seed,
index), so it knows which group each negative changes, and splits the accuracy of each type by the
size of the changed group(s), and that of replace-object by the shape replaced:

    python tools/compositional_errors.py --checkpoint runs/demo/run/checkpoints/step_00000600.pt
    python tools/compositional_errors.py --checkpoint CK --training-scenes   # the same test on training scenes

Per-type accuracies equal `vlp eval --task compositional` on the exported layout (tested). Prints
a table and writes JSON (default: the run's eval/ folder beside checkpoints/).
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import torch
from tqdm import tqdm

import vlp
from vlp.demo import VAL_START
from vlp.eval.synthetic_layouts import (
    NEGATIVE_TYPES,
    SIZE_SWAP,
    accepted_scenes,
    layout_start,
    negative_groups,
    negatives,
    size_swap,
)

BATCH = 100


def changed_key(kind: str, groups: list[dict], new: list[dict]) -> tuple[str, str]:
    """``(size key, shape replaced)``: the sizes of the groups ``new`` changes, joined by "+" in
    sorted order ("large", "small", "large+small", ...), and for replace_object the old shape ("" else)."""
    changed = [g for g, n in zip(groups, new) if g != n]
    shape = changed[0]["shape"] if kind == "replace_object" and len(changed) == 1 else ""
    return "+".join(sorted(g["size"] for g in changed)), shape


def items(seed: int, first_index: int, num: int, size_first_index: int) -> list[dict]:
    """One item per (scene, negative type) for the first ``num`` scenes from ``first_index`` on that
    the compositional layout accepts, then one swap_size item per scene for the first ``num`` from
    ``size_first_index`` on that have a size swap (the layout's rows, in its order)."""
    out = []
    for scene, captions in accepted_scenes(seed, first_index, num, lambda s: negatives(s, seed), "scenes", True):
        changed = negative_groups(scene, seed)
        for kind in NEGATIVE_TYPES:
            size, shape = changed_key(kind, scene.meta["groups"], changed[kind])
            out.append({"scene": scene, "kind": kind, "negative": captions[kind], "size": size, "shape": shape})
    for scene, negative in accepted_scenes(seed, size_first_index, num, size_swap, "size-swap scenes", True):
        out.append({"scene": scene, "kind": SIZE_SWAP, "negative": negative, "size": "large+small", "shape": ""})
    return out


@torch.no_grad()
def score(model, preprocess, tokenizer, rows: list[dict]) -> list[bool]:
    """Whether the positive caption scores strictly above the negative, as `vlp eval` counts it."""
    hits = []
    for i in tqdm(range(0, len(rows), BATCH), desc="scoring", unit="batch", leave=False):
        chunk = rows[i : i + BATCH]
        image = model.encode_image(torch.stack([preprocess(r["scene"].image) for r in chunk]))
        positive = model.encode_text(tokenizer([r["scene"].caption for r in chunk]))
        negative = model.encode_text(tokenizer([r["negative"] for r in chunk]))
        hits += ((image * positive).sum(-1) > (image * negative).sum(-1)).tolist()
    return hits


def summarise(rows: list[dict], hits: list[bool]) -> dict:
    """Accuracy and item count per type, per (type, size key) and per replaced shape."""
    tally = defaultdict(lambda: [0, 0])
    for r, hit in zip(rows, hits):
        keys = [("by_type", r["kind"]), ("by_size", f"{r['kind']}/{r['size']}")]
        keys += [("by_shape_replaced", r["shape"])] if r["shape"] else []
        for key in keys:
            tally[key][0] += hit
            tally[key][1] += 1
    out: dict = {"by_type": {}, "by_size": {}, "by_shape_replaced": {}}
    for (table, key), (right, n) in sorted(tally.items()):
        out[table][key] = {"acc": right / n, "items": n}
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", help="vlp checkpoint (or an open_clip file with --model)")
    p.add_argument("--model", help="architecture (with no --checkpoint: random init)")
    p.add_argument("--seed", type=int, default=0, help="the shapes data's seed (vlp demo's: 0)")
    p.add_argument("--num", type=int, default=500, help="scenes (3 items each), and as many size-swap scenes")
    p.add_argument("--start-index", type=int, default=2 * VAL_START, help="as given to export_eval_layouts")
    p.add_argument("--training-scenes", action="store_true", help="scenes 0.. (vlp demo's training scenes) instead")
    p.add_argument("--out", type=Path, help="JSON file (default: the run's eval/ folder, or the current folder)")
    return p


def main(argv=None) -> dict:
    p = build_parser()
    args = p.parse_args(argv)
    if not args.checkpoint and not args.model:
        p.error("give --checkpoint, --model or both")
    model, preprocess, tokenizer = vlp.load_model(args.checkpoint or args.model, model_name=args.model)
    model.eval()
    scenes = "training" if args.training_scenes else "heldout"
    first = 0 if args.training_scenes else layout_start("compositional", args.start_index)
    size_first = 0 if args.training_scenes else layout_start("compositional_size", args.start_index)
    rows = items(args.seed, first, args.num, size_first)
    result = {"checkpoint": args.checkpoint, "model": args.model, "seed": args.seed, "scenes": scenes}
    result.update(first_index=first, size_first_index=size_first, num_scenes=args.num)
    result.update(summarise(rows, score(model, preprocess, tokenizer, rows)))
    out = args.out
    if out is None:
        ckpt = Path(args.checkpoint) if args.checkpoint else None
        run_dir = ckpt.parent.parent if ckpt and ckpt.parent.name == "checkpoints" else Path(".")
        out = run_dir / ("eval" if run_dir != Path(".") else "") / f"compositional_errors-{scenes}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    for table in ("by_type", "by_size", "by_shape_replaced"):
        print(f"{table}:")
        for key, v in result[table].items():
            print(f"  {key:38} {v['acc']:.3f}  ({v['items']} items)")
    print(f"results in {out}")
    return result


if __name__ == "__main__":
    main()
