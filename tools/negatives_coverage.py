"""Coverage of the rule-based hard negatives (vlp.data.negatives) per type, on real caption text.

A type covers a caption when it gives that caption at least one negative (``generate(caption,
[type], k, seed)`` is not empty). The script prints a markdown table, per type: captions covered /
total, the share, and a few example (caption → negative) pairs; it writes the same as JSON, with
the first uncovered captions of every type:

    python tools/negatives_coverage.py tests/data/negatives_captions.txt --out runs/coverage.json
    python tools/negatives_coverage.py annotations/captions_val2014.json --limit 5000 --json

The input is a text file (one caption a line; empty lines and lines starting with "#" skipped) or
JSON: COCO's caption annotations ({"annotations": [{"caption": ...}]}), Karpathy's split files
({"images": [{"sentences": [{"raw": ...}]}]}) or a list of strings. Caption i is seeded with
``--seed + i``, so a run is reproducible.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tqdm import tqdm

from vlp.data.negatives import TYPES, check_types, generate

PROGRESS_FROM = 500  # captions: a progress bar from this many on (on a terminal)


def read_captions(path: Path) -> list[str]:
    """The captions of a text or JSON file (formats in the module docstring), stripped, non-empty."""
    text = path.read_text(encoding="utf-8-sig")
    if path.suffix.lower() != ".json":
        lines = (line.strip() for line in text.splitlines())
        return [line for line in lines if line and not line.startswith("#")]
    data = json.loads(text)
    if isinstance(data, dict) and "annotations" in data:
        found = [a.get("caption", "") for a in data["annotations"]]
    elif isinstance(data, dict) and "images" in data:
        found = [s.get("raw", "") for image in data["images"] for s in image.get("sentences", [])]
    elif isinstance(data, list):
        found = data
    else:
        raise ValueError(f"{path}: expected COCO captions, Karpathy's split file or a list of strings")
    return [c.strip() for c in found if isinstance(c, str) and c.strip()]


def coverage(captions: list[str], types: tuple[str, ...], k: int, seed: int, examples: int) -> dict:
    """{type: {covered, total, share, examples: [[caption, negative]], uncovered: [caption]}}, and
    ``any_replace_or_swap``: captions with a negative of at least one of the replace/swap types."""
    rows = {t: {"covered": 0, "total": len(captions), "hits": [], "uncovered": []} for t in types}
    union = 0
    bar = tqdm(captions, desc="captions", unit="caption", disable=None if len(captions) >= PROGRESS_FROM else True)
    for i, caption in enumerate(bar):
        any_hit = False
        for kind in types:
            negatives = generate(caption, [kind], k, seed=seed + i)
            row = rows[kind]
            if negatives:
                row["covered"] += 1
                row["hits"].append((caption, negatives[0][0]))
                any_hit |= not kind.startswith("shuffle")
            elif len(row["uncovered"]) < 3 * examples:
                row["uncovered"].append(caption)
        union += any_hit
    out = {}
    for kind, row in rows.items():
        picked = random.Random(f"{seed}/{kind}").sample(row["hits"], min(examples, len(row["hits"])))
        total = row["total"]
        out[kind] = {
            "covered": row["covered"],
            "total": total,
            "share": row["covered"] / total if total else 0.0,
            "examples": [list(pair) for pair in picked],
            "uncovered": row["uncovered"],
        }
    out["any_replace_or_swap"] = {
        "covered": union,
        "total": len(captions),
        "share": union / len(captions) if captions else 0.0,
    }
    return out


def markdown(result: dict, examples: int) -> str:
    """The table: type, covered / total, share, and up to ``examples`` (caption → negative) pairs."""
    lines = ["| type | captions with ≥ 1 negative | share | example (caption → negative) |", "|---|---|---|---|"]
    for kind, row in result.items():
        shown = "; ".join(f"{c} → {n}" for c, n in row.get("examples", [])[:examples]).replace("|", "\\|")
        lines.append(f"| `{kind}` | {row['covered']} / {row['total']} | {row['share']:.1%} | {shown} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("captions", type=Path, help="caption file: text (one a line) or COCO/Karpathy JSON")
    parser.add_argument("--types", default=",".join(TYPES), help="comma-separated types (default: all)")
    parser.add_argument("--k", type=int, default=4, help="negatives asked per caption and type (default 4)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="only the first N captions (0: all)")
    parser.add_argument("--examples", type=int, default=2, help="example pairs per type in the table (default 2)")
    parser.add_argument("--out", type=Path, help="write the JSON result here")
    parser.add_argument("--json", action="store_true", help="print the JSON result instead of the table")
    args = parser.parse_args(argv)
    types = check_types([t.strip() for t in args.types.split(",") if t.strip()])
    captions = read_captions(args.captions)
    if args.limit > 0:
        captions = captions[: args.limit]
    if not captions:
        parser.error(f"no captions in {args.captions}")
    result = {
        "input": str(args.captions),
        "num_captions": len(captions),
        "k": args.k,
        "seed": args.seed,
        "types": coverage(captions, types, args.k, args.seed, args.examples),
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    if args.json:
        print(json.dumps(result, indent=1, ensure_ascii=False))
    else:
        print(f"{len(captions)} captions from {args.captions}, k={args.k}, seed={args.seed}\n")
        print(markdown(result["types"], args.examples))
        if args.out:
            print(f"\nJSON in {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
