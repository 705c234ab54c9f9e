"""Shared driver of the small-scale replications (tools/replicate_counting.py, replicate_negatives.py).

Each trains the `debug` CLIP of `configs/demo.yaml` on the synthetic shapes twice per seed, with
the same data, steps and seed: a baseline, and a variant with one addition (the script's own
overrides). Both are evaluated on the demo's held-out tasks: zero-shot classification, retrieval,
compositional and counting (counts 2..6). Compositional: ``compositional_acc`` is the mean of swap
attribute (the two groups' colours), replace attribute (a colour) and replace object (a shape);
``compositional_attribute_acc`` that of the two colour types, the issue's "swap/replace attribute";
``compositional_swap_size`` the held-out size swap (the two groups' sizes, on scenes of its own),
and ``compositional_color_size_acc`` the mean of every attribute type: both swaps and replace
attribute. ``--set`` changes both runs; ``--variant-set`` changes the variant only, after its own
settings, so it can override them (``--variant-set loss.negatives.image_grounded_weight=3``). The script prints a
table, writes ``<out>/replicate_<name>.json`` and, with ``--json``, prints that JSON object. The shapes
data goes to ``<out>/data``; data already there (from an earlier run, or `vlp demo --out` the same
folder) is reused when it is up to date. With ``--eval-every N`` both runs are also evaluated
every N steps, and the table and the JSON (``curve``) give the gain at each of those steps.
``--baseline-from DIR`` trains only the variant: each seed's baseline is the one an earlier run with
``--out DIR`` trained (its row in ``DIR/replicate_<name>.json``), used only where the config that run
saved (``DIR/baseline-seed<N>/config.yaml``) is the one this run would train (same steps, seed,
``--set``, data); the variant then trains and is evaluated on ``DIR/data``, and its runs and the JSON
go to ``--out`` as usual. The check covers the config, not the code: reuse baselines of the current code.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

QUICK_IMAGES = 2000  # --quick: training images when none are there yet, and the variant's own data

METRICS = {  # report key -> the trainer's final eval key
    "zeroshot_acc1": "zeroshot_classification/acc1",
    "retrieval_t2i_r1": "zeroshot_retrieval/image_retrieval_recall@1",
    "retrieval_i2t_r1": "zeroshot_retrieval/text_retrieval_recall@1",
    "compositional_swap_attribute": "compositional/acc_swap_attribute",
    "compositional_replace_attribute": "compositional/acc_replace_attribute",
    "compositional_replace_object": "compositional/acc_replace_object",
    "compositional_swap_size": "compositional/acc_swap_size",
    "counting_acc": "counting/acc",
}
# report key -> the report keys it is the mean of. compositional_acc keeps its three types (the
# eval's own compositional/acc also counts the swap_size rows), so it compares with earlier runs.
COLOR_TYPES = ("compositional_swap_attribute", "compositional_replace_attribute")
DERIVED = {
    "compositional_acc": (*COLOR_TYPES, "compositional_replace_object"),
    "compositional_attribute_acc": COLOR_TYPES,  # the "compositional accuracy (swap/replace attribute)"
    "compositional_color_size_acc": (*COLOR_TYPES, "compositional_swap_size"),
}
REPORTED = [*METRICS, *DERIVED]


def build_parser(name: str, default_steps: int = 600, add_options: Callable | None = None) -> argparse.ArgumentParser:
    """The command line of ``tools/replicate_<name>.py``; ``add_options(parser)`` adds the script's own options."""
    p = argparse.ArgumentParser(description=f"baseline vs {name} on the shapes data (see {__file__})")
    p.add_argument("--out", default=f"runs/replicate_{name}", help="data, runs and the JSON go here")
    p.add_argument("--steps", type=int, default=default_steps, help="training steps of every run")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one baseline and one variant per seed")
    p.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 2,000 training images")
    p.add_argument(
        "--train-images",
        type=int,
        default=0,
        metavar="N",
        help="unique training images, a multiple of 1,000 (default: the demo's 12,000; with 76,000, 600 steps at "
        "batch 128 see each about once)",
    )
    p.add_argument("--json", action="store_true", help="print only the JSON object")
    p.add_argument(
        "--eval-every", type=int, default=0, metavar="N", help="also evaluate every N steps: the gain along training"
    )
    p.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override (both runs)")
    p.add_argument(
        "--variant-set",
        dest="variant_sets",
        action="append",
        default=[],
        help="extra config override of the variant only, applied after the script's own variant settings",
    )
    p.add_argument(
        "--baseline-from",
        metavar="DIR",
        default="",
        help="reuse the baselines an earlier run with --out DIR trained (same config checked); train the variant only",
    )
    if add_options is not None:
        add_options(p)
    return p


def parse_args(
    name: str, default_steps: int = 600, add_options: Callable | None = None, argv: list[str] | None = None
) -> argparse.Namespace:
    """``argv`` (default: the command line) read by :func:`build_parser`; exits with a usage error as argparse does."""
    p = build_parser(name, default_steps, add_options)
    args = p.parse_args(argv)
    from vlp import demo

    if args.train_images and (args.train_images < 0 or args.train_images % demo.PER_SHARD):
        p.error(
            f"--train-images must be a positive multiple of {demo.PER_SHARD} (shards of that size), "
            f"got {args.train_images}"
        )
    return args


def _data(out: Path, quick: bool, seed: int, train_images: int = 0) -> int:
    """Make (or reuse) the shapes data under ``out/data``; the number of training images used."""
    from vlp import demo

    info = out / "data" / "train" / "_info.json"
    if train_images:
        demo.TRAIN_SAMPLES = train_images
    elif quick:  # fewer training shards (or those already there); the held-out sets stay as the demo's
        demo.TRAIN_SAMPLES = json.loads(info.read_text())["num_samples"] if info.is_file() else QUICK_IMAGES
    demo.make_demo_data(out / "data", seed)
    return demo.TRAIN_SAMPLES


def _config(data_root: Path, run_dir: Path, steps: int, seed: int, overrides: list[str], every: int):
    """The config of one run: the demo's on the shapes data under ``data_root``, written to ``run_dir``."""
    from vlp.demo import demo_config

    sets = [f"train.seed={seed}", f"train.eval_every={every}", "train.checkpoint_every=0", "train.progress=off"]
    cfg = demo_config(data_root, steps, [*sets, *overrides])
    cfg.train.output_dir = str(run_dir)
    return cfg


def _run(
    out: Path,
    name: str,
    steps: int,
    seed: int,
    overrides: list[str],
    quiet: bool,
    every: int = 0,
    data_root: Path | None = None,
) -> dict:
    """One training run (on the data under ``data_root``, default ``out``); its final metrics and, with
    ``every`` > 0, ``curve``: step -> metrics."""
    from vlp.train.trainer import Trainer

    run_dir = out / f"{name}-seed{seed}"
    cfg = _config(data_root or out, run_dir, steps, seed, overrides, every)
    t0 = time.perf_counter()
    sink = io.StringIO()
    trainer = Trainer(cfg)
    with contextlib.redirect_stdout(sink) if quiet else contextlib.nullcontext():
        summary = trainer.train()
    row = {**_report(summary["eval"]), "seconds": round(time.perf_counter() - t0, 1), "run": str(run_dir)}
    if every:
        row["curve"] = {str(r["step"]): _report(r) for r in trainer.eval_results}
    return row


def _reused_baselines(base: Path, name: str, steps: int, args: argparse.Namespace) -> tuple[int, list[dict]]:
    """``--baseline-from base``: the training images and, per seed of ``args.seeds``, the baseline row an
    earlier run with ``--out base`` wrote, each checked against the config this run would give it."""
    import yaml

    from vlp import demo

    path = base / f"replicate_{name}.json"
    if not path.is_file():
        sys.exit(f"--baseline-from {base}: no {path.name} there (an earlier run of replicate_{name}.py --out {base})")
    earlier = json.loads(path.read_text())
    images = earlier["train_images"]
    if args.train_images and args.train_images != images:
        sys.exit(f"--baseline-from {base}: its baselines trained on {images} images, not {args.train_images}")
    demo.TRAIN_SAMPLES = images  # the shards the baselines' config names
    rows = dict(zip(earlier["seeds"], earlier["runs"]["baseline"]))
    reused = []
    for seed in args.seeds:
        run_dir = Path(rows[seed]["run"]) if seed in rows else base / f"baseline-seed{seed}"  # as that run spelled it
        saved = run_dir / "config.yaml"
        if seed not in rows or run_dir.parent.resolve() != base.resolve() or not saved.is_file():
            sys.exit(f"--baseline-from {base}: no baseline of seed {seed} there (seeds {earlier['seeds']})")
        want = _config(run_dir.parent, run_dir, steps, seed, args.overrides, args.eval_every)
        changed = _config_differences(yaml.safe_load(saved.read_text()), want)
        if changed:
            sys.exit(f"--baseline-from {base}: the baseline of seed {seed} had another config: {'; '.join(changed)}")
        reused.append(rows[seed])
    return images, reused


def _flat(tree: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def _config_differences(saved: dict, cfg) -> list[str]:
    """``key: saved -> cfg's`` where the config a run saved is not ``cfg``, filled in as the trainer fills
    in the one it saves (the model's preprocessing). A key the saved config lacks (added since) counts
    only where ``cfg`` sets it to other than its default."""
    from vlp.config import Config
    from vlp.models.registry import build

    given, default = _flat(cfg.to_dict()), _flat(Config().to_dict())
    cfg.model = build(cfg.model)[1]
    old, new = _flat(saved), _flat(cfg.to_dict())
    out = []
    for key in sorted(set(old) | set(new)):
        if key in ("train.resume", "train.overwrite") or (key not in old and given.get(key) == default.get(key)):
            continue
        if old.get(key) != new.get(key):
            out.append(f"{key}: {old.get(key)!r} -> {new.get(key)!r}")
    return out


def _report(evaluated: dict) -> dict:
    """The report's metrics (None where not evaluated) from the trainer's eval keys."""
    out = {k: evaluated.get(v) for k, v in METRICS.items()}
    for k, parts in DERIVED.items():
        values = [out[p] for p in parts]
        out[k] = None if None in values else statistics.fmean(values)
    return out


def _mean(rows: list[dict], key: str) -> float | None:
    values = [r[key] for r in rows if r.get(key) is not None]
    return statistics.fmean(values) if values else None


def _compare(rows_by_arm: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Each arm's mean over seeds of every metric, and the variant's gain over the baseline."""
    means = {arm: {k: _mean(rows, k) for k in REPORTED} for arm, rows in rows_by_arm.items()}
    delta = {k: means["variant"][k] - means["baseline"][k] for k in REPORTED if means["baseline"][k] is not None}
    return means, delta


def _curve(runs: dict[str, list[dict]]) -> dict | None:
    """Per evaluated step (those every run has): each arm's mean over seeds, and the variant's gain."""
    rows = [r for kind in runs.values() for r in kind]
    if not rows or not all("curve" in r for r in rows):
        return None
    steps = sorted(set.intersection(*(set(r["curve"]) for r in rows)), key=int)
    curve = {}
    for step in steps:
        means, delta = _compare({arm: [r["curve"][step] for r in rows_] for arm, rows_ in runs.items()})
        curve[step] = {**means, "delta": delta}
    return curve


def _print_curve(curve: dict, targets: dict[str, float]) -> None:
    keys = list(dict.fromkeys([*targets, "zeroshot_acc1"]))
    print(f"\n{'step':>6}" + "".join(f"{k + ' (base/var/delta)':>44}" for k in keys))
    for step, arms in curve.items():
        cells = [f"{arms['baseline'][k]:.3f} / {arms['variant'][k]:.3f} / {arms['delta'][k]:+.3f}" for k in keys]
        print(f"{step:>6}" + "".join(f"{c:>44}" for c in cells))


def replicate(
    name: str,
    variant_overrides: list[str],
    targets: dict[str, float],
    default_steps: int = 600,
    variant_data: Callable[[Path, int, argparse.Namespace], list[str]] | None = None,
    add_options: Callable[[argparse.ArgumentParser], None] | None = None,
) -> dict:
    """Run baseline and variant for every seed; ``targets``: metric -> required mean gain (negative:
    the largest allowed drop). ``variant_data(out, images, args)``, if given, makes the variant's own
    training data of that many images (as many as the baseline's; 2,000 with --quick) under
    ``out`` and returns the overrides that point the variant at it. ``add_options(parser)`` adds a
    script's own command-line options; ``args`` holds them."""
    args = parse_args(name, default_steps, add_options)
    out = Path(args.out)
    steps = 20 if args.quick else args.steps
    base = Path(args.baseline_from) if args.baseline_from else None
    if base is not None:  # the earlier run's data, as it is: the variant trains and is evaluated on it too
        train_images, reused = _reused_baselines(base, name, steps, args)
    else:
        train_images, reused = _data(out, args.quick, 0, args.train_images), None
    if variant_data is not None:
        variant_overrides = [*variant_overrides, *variant_data(out, QUICK_IMAGES if args.quick else train_images, args)]
    variant_overrides = [*variant_overrides, *args.variant_sets]
    runs = {"baseline": [], "variant": []}
    for i, seed in enumerate(args.seeds):
        for kind, extra in (("baseline", []), ("variant", variant_overrides)):
            if kind == "baseline" and reused is not None:
                runs[kind].append(reused[i])
            else:
                row = _run(out, kind, steps, seed, args.overrides + extra, args.json, args.eval_every, base)
                runs[kind].append(row)
            if not args.json:
                shown = ", ".join(f"{k} {v:.3f}" for k, v in runs[kind][-1].items() if k in REPORTED and v is not None)
                print(f"{kind} seed {seed}: {shown}", flush=True)
    means, delta = _compare(runs)
    checks = {k: {"required": t, "delta": delta[k], "met": delta[k] >= t} for k, t in targets.items()}
    result = {
        "name": name,
        "variant_overrides": variant_overrides,
        "steps": steps,
        "seeds": args.seeds,
        "quick": args.quick,
        "train_images": train_images,
        "overrides": args.overrides,
        "baseline_from": str(base) if base is not None else None,
        "baseline": means["baseline"],
        "variant": means["variant"],
        "delta": delta,
        "targets": checks,
        "curve": _curve(runs),
        "runs": runs,
    }
    path = out / f"replicate_{name}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"\n{'metric':<32}{'baseline':>10}{'variant':>10}{'delta':>9}")
        for k in REPORTED:
            b, v = means["baseline"][k], means["variant"][k]
            if b is not None:
                print(f"{k:<32}{b:>10.3f}{v:>10.3f}{v - b:>+9.3f}")
        if result["curve"]:
            _print_curve(result["curve"], targets)
        for k, c in checks.items():
            verdict = "met" if c["met"] else "NOT met"
            print(f"target {k}: delta {c['delta']:+.3f}, required {c['required']:+.3f}: {verdict}")
        print(f"wrote {path}")
    return result
