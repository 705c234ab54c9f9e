"""``vlp demo``: shapes shards -> train the debug CLIP on CPU -> evaluate -> report.json + PNG."""

from __future__ import annotations

import json
import time
from pathlib import Path

from vlp.config import load_config

DEMO_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "demo.yaml"
TRAIN_SAMPLES, VAL_SAMPLES, PER_SHARD = 12_000, 500, 1000
VAL_START = 10_000_000  # held-out sample indices never used for training


def make_demo_data(data_dir: Path, seed: int = 0) -> tuple[dict, dict]:
    from vlp.data.shards import write_synthetic_shards
    from vlp.eval.synthetic_layouts import export_eval_layouts

    train = write_synthetic_shards(
        data_dir / "train", TRAIN_SAMPLES, seed=seed, max_samples_per_shard=PER_SHARD, prefix="shapes"
    )
    val = write_synthetic_shards(
        data_dir / "val",
        VAL_SAMPLES,
        seed=seed,
        start_index=VAL_START,
        single_group=True,
        max_samples_per_shard=PER_SHARD,
        prefix="shapes",
    )
    # held-out compositional and counting benchmarks, from index ranges used by no other split
    export_eval_layouts(data_dir / "eval", num_images=VAL_SAMPLES, seed=seed, start_index=2 * VAL_START)
    return train, val


def demo_config(out: Path, steps: int | None, overrides: list[str], config: str | Path = DEMO_CONFIG):
    """``config`` (default ``configs/demo.yaml``) pointed at the shapes data under ``out``."""
    config = Path(config)
    if not config.is_file():
        where = "run vlp demo from a source checkout (pip install -e .)" if config == DEMO_CONFIG else "check the path"
        raise FileNotFoundError(f"{config} is missing: {where}")
    data = out / "data"
    val = f"{data}/val/shapes-000000.tar"
    layouts = {
        "zeroshot_classification": val,
        "zeroshot_retrieval": val,
        "retrieval": val,
        "compositional": f"{data}/eval/compositional.jsonl",
        "counting": f"{data}/eval/counting.jsonl",
    }
    sets = [
        f"data.train_shards=['{data}/train/shapes-{{000000..{TRAIN_SAMPLES // PER_SHARD - 1:06d}}}.tar']",
        f"data.val_shards=['{val}']",
        f"train.output_dir={out / 'run'}",
        "train.overwrite=true",  # the demo starts over each time it is run
    ]
    if steps is not None:
        sets.append(f"train.steps={steps}")
    tasks = load_config(config, sets + list(overrides)).eval.tasks
    unknown = [t for t in tasks if t not in layouts]
    if unknown:
        raise ValueError(f"{config}: vlp demo has no shapes data for eval task(s) {unknown}; use {sorted(layouts)}")
    sets.append("eval.data=[" + ", ".join(f"'{layouts[t]}'" for t in tasks) + "]")
    return load_config(config, sets + list(overrides))


def build_report(summary: dict, cfg, seconds: float) -> dict:
    ev = summary["eval"]
    zs, rt = "zeroshot_classification/", "zeroshot_retrieval/"
    return {
        "zeroshot_acc1": ev.get(zs + "acc1"),
        "zeroshot_acc5": ev.get(zs + "acc5"),
        "zeroshot_mean_per_class_recall": ev.get(zs + "mean_per_class_recall"),
        "zeroshot_chance": ev.get(zs + "chance"),
        "retrieval_i2t_r1": ev.get(rt + "text_retrieval_recall@1"),
        "retrieval_t2i_r1": ev.get(rt + "image_retrieval_recall@1"),
        "retrieval_i2t_r5": ev.get(rt + "text_retrieval_recall@5"),
        "retrieval_t2i_r5": ev.get(rt + "image_retrieval_recall@5"),
        "retrieval_chance_r1": ev.get(rt + "chance_image_retrieval_recall@1"),
        "retrieval_chance_r5": ev.get(rt + "chance_image_retrieval_recall@5"),
        "compositional_acc": ev.get("compositional/acc"),
        "compositional_chance": ev.get("compositional/chance"),
        "counting_acc": ev.get("counting/acc"),
        "counting_mae": ev.get("counting/mae"),
        "counting_chance": ev.get("counting/chance"),
        "num_val_images": ev.get(rt + "num_images"),
        "steps": summary["step"],
        "train_seconds": round(seconds, 1),
        "checkpoint": summary["checkpoint"],
        "skipped": summary["skipped"],
        "model": cfg.model.name,
        "seed": cfg.train.seed,
    }


def run_demo(out: str | Path = "runs/demo", steps: int | None = None, overrides=(), config=DEMO_CONFIG) -> dict:
    from vlp.train.trainer import Trainer
    from vlp.viz import plot_run

    out = Path(out)
    cfg = demo_config(out, steps, list(overrides), config)
    t0 = time.perf_counter()
    make_demo_data(out / "data", cfg.train.seed)
    print(f"vlp demo: shards ready in {out / 'data'} ({time.perf_counter() - t0:.0f}s)", flush=True)
    t0 = time.perf_counter()
    summary = Trainer(cfg).train()
    report = build_report(summary, cfg, time.perf_counter() - t0)
    report.update(caption_report(summary["checkpoint"], out / "data" / "val" / "shapes-000000.tar", out))
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_run(out / "run" / "metrics.jsonl", out / "report.png")
    print_summary(report, out)
    return report


def caption_report(checkpoint: str, val_shard: Path, out: Path, limit: int = 500) -> dict:
    """For a CoCa checkpoint: greedy captions of the held-out images, saved to ``out/captions.json``,
    and how often they name the right shape and colour (:mod:`vlp.eval.shape_captions`)."""
    import io

    import torch
    from PIL import Image

    import vlp
    from vlp.eval.shape_captions import read_single_group_shard, shape_caption_metrics
    from vlp.models.generate import caption_images

    model, preprocess, tokenizer = vlp.load_model(checkpoint)
    if not hasattr(model, "text_decoder"):
        return {}
    data, labels = read_single_group_shard(str(val_shard), limit)
    images = [Image.open(io.BytesIO(b)).convert("RGB") for b in data]
    with torch.no_grad():
        captions = caption_images(model, tokenizer, images, preprocess=preprocess, strategy="greedy")
    rows = [{"colour": c, "shape": s, "caption": cap} for (c, s), cap in zip(labels, captions)]
    (out / "captions.json").write_text(json.dumps(rows, indent=1) + "\n")
    return {**shape_caption_metrics(captions, labels), "caption_examples": rows[:5]}


def print_summary(report: dict, out: Path) -> None:
    rows = [
        ("zero-shot acc@1", report["zeroshot_acc1"], report["zeroshot_chance"]),
        ("image->text R@1", report["retrieval_i2t_r1"], report["retrieval_chance_r1"]),
        ("text->image R@1", report["retrieval_t2i_r1"], report["retrieval_chance_r1"]),
        ("image->text R@5", report["retrieval_i2t_r5"], report["retrieval_chance_r5"]),
        ("compositional acc", report["compositional_acc"], report["compositional_chance"]),
        ("counting acc", report["counting_acc"], report["counting_chance"]),
        ("caption: shape", report.get("caption_names_shape"), report.get("caption_shape_chance")),
        ("caption: colour", report.get("caption_names_colour"), report.get("caption_colour_chance")),
    ]
    print(f"\n{'metric':<18}{'vlp demo':>10}{'chance':>10}")
    for name, value, chance in rows:
        if value is None:
            continue
        print(f"{name:<18}{value:>10.3f}{chance:>10.3f}")
    print(f"\ntrained {report['steps']} steps in {report['train_seconds']:.0f}s")
    print(f"vlp demo: report in {out / 'report.json'}, plot in {out / 'report.png'}")
    print(f"vlp demo: checkpoint {report['checkpoint']}")
