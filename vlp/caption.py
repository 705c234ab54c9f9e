"""``vlp caption``: caption a folder or glob of images with a CoCa model, print and save them."""

from __future__ import annotations

import glob
import json
import sys
from pathlib import Path

MAX_LISTED_SKIPS = 20  # unreadable files named one by one; the rest are only counted


def find_images(spec: str) -> list[str]:
    """The image files (jpg, jpeg, png, webp, bmp) under folder ``spec``, recursively, or every file
    matching glob ``spec`` (``**`` recursive), sorted. Raises FileNotFoundError when none."""
    from vlp.eval.datasets import IMAGE_EXTENSIONS

    root = Path(spec).expanduser()
    if root.is_dir():
        files = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        where = f"in {root} (looked for {', '.join(IMAGE_EXTENSIONS)}, recursively)"
    else:
        files = sorted(p for p in glob.glob(str(root), recursive=True) if Path(p).is_file())
        where = f"matching {spec!r}"
    if not files:
        raise FileNotFoundError(f"no image files {where}")
    return files


def _generate_kw(args, device) -> dict:
    import torch

    kw = {"strategy": args.strategy, "max_len": args.max_len, "min_len": args.min_len, "num_beams": args.num_beams}
    if args.strategy == "sample":
        generator = torch.Generator(device=device).manual_seed(args.seed)
        kw.update(top_k=args.top_k, top_p=args.top_p, temperature=args.temperature, generator=generator)
    return kw


def _report_skips(paths: list[str], failed: list[tuple[int, str]]) -> None:
    if not failed:
        return
    for index, kind in failed[:MAX_LISTED_SKIPS]:
        print(f"vlp caption: skipped {paths[index]} ({kind})", file=sys.stderr)
    counts: dict[str, int] = {}
    for _, kind in failed:
        counts[kind] = counts.get(kind, 0) + 1
    print(f"vlp caption: skipped {len(failed)} unreadable image(s): {counts}", file=sys.stderr)


def run_caption_command(args) -> int:
    """Load the model, caption every image found by ``--images``, print ``path<TAB>caption`` lines
    and write ``[{"image", "caption"}, ...]`` to ``--output``. Raises GenerationError for a model
    that is not a CoCa, ConfigError without ``--checkpoint``/``--model``, FileNotFoundError when
    no image is found."""
    import vlp
    from vlp.distributed import DistEnv, resolve_device
    from vlp.eval.captioning import caption_image_list
    from vlp.eval.cli import check_sources, describe_loaded, image_policy_of
    from vlp.models.generate import check_captioner

    check_sources(args)
    device = resolve_device(args.device)
    model, preprocess, tokenizer = vlp.load_model(
        args.checkpoint or args.model or args.pretrained, args.model, device=device,
        pretrained=None if args.checkpoint else args.pretrained or None,
    )  # fmt: skip
    check_captioner(model)
    print(f"vlp caption: {describe_loaded(model, args)}", file=sys.stderr, flush=True)
    paths = find_images(args.images)
    captions, failed = caption_image_list(
        model,
        tokenizer,
        paths,
        preprocess,
        DistEnv(device=device),
        batch_size=args.batch_size,
        workers=args.workers,
        policy=image_policy_of(args),
        **_generate_kw(args, device),
    )
    rows = [{"image": paths[i], "caption": captions[i]} for i in sorted(captions)]
    for row in rows:
        print(f"{row['image']}\t{row['caption']}")
    _report_skips(paths, failed)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(f"vlp caption: {len(rows)} caption(s) in {out}")
    return 0
