"""Benchmark a full training step (forward, loss, backward, optimizer): vlp's Trainer against open_clip's loop.

What it measures, per architecture, on one device: samples per second of S consecutive
optimizer steps on one fixed batch (the data pipeline is tools/bench/data.py's subject), the
median of R repeats after W warm-up steps:

* vlp: ``vlp.train.trainer.Trainer.train_step`` itself, the step ``vlp train`` runs: zero the
  gradients, forward + ``Objective`` (InfoNCE, impl gather) + backward (``forward_backward``),
  the non-finite guard, gradient clipping, AdamW (``build_optimizer``: fused where torch has the
  kernel), the schedule, the logit-scale clamp; the batch holds uint8 images as vlp's stream
  yields them (normalised on the device). After the S steps the loss is read once, as the
  trainer's ``log_every`` does.
* open_clip: ``open_clip_train.train.train_one_epoch`` itself over S batches (its per-step
  schedule, ``ClipLoss`` with open_clip_train's defaults: ``local_loss=False``,
  ``gather_with_grad=False``, ``cache_labels=True``; its logging at the first and last step), with
  the AdamW ``open_clip_train/main.py`` builds (torch's default implementation: ``foreach`` on
  CUDA, a per-parameter loop on CPU; no weight decay on gains, biases and the logit scale); its
  batch holds the same pixels as normalised float32, as its data loader yields them.

Both sides: the same architecture and weights (open_clip's model loads vlp's initial state dict),
batch, precision (``fp32`` or ``bf16`` autocast), lr / betas / eps / weight decay (vlp's
``train.*``), warm-up length, gradient clipping (``train.grad_clip``: open_clip's
``--grad-clip-norm``), and the options under test: ``--grad-checkpointing`` (both
``set_grad_checkpointing``), ``--patch-dropout P`` (vlp ``model.patch_dropout``, open_clip
``force_patch_dropout``), ``--compile`` (vlp ``train.compile``, open_clip ``torch.compile(model)``
as ``--torchcompile`` does). The repeats alternate which side runs first. ``--vs-base`` adds a
third side, vlp without those options, to measure what they buy (``speedup_vs_base``). ``--ema``
adds vlp with a weight EMA (``train.ema.decay=0.9999``: one fp32 ``_foreach_lerp_`` over the
trainable weights after each step), the same weights and batch: ``ema_cost`` = its step time over
vlp's without it (> 1: what the average costs), and ``ema_update_ms``, the update alone (median
of 3 x 5 updates; ``ema_update_share``: over vlp's step time), which stays measurable where the
ratio is within the noise of long steps.

Columns: samples/s of each side, ratio = vlp / open_clip (> 1: vlp faster), first step (warm-up
incl. compilation), model TFLOP/s = samples/s x 3 x forward FLOPs per sample (forward counted by
``torch.utils.flop_counter`` on the training-mode model; backward = 2 x forward; recomputation
by checkpointing not counted) and MFU = that over the device's dense bf16 peak (H100 SXM / H200:
989 TFLOP/s, A100: 312; detected from the device name, or ``--peak-tflops``). On CUDA the vlp
step is also run once under ``torch.cuda.set_sync_debug_mode("warn")`` and its host syncs counted.

Run from the repository root:
    python tools/bench/train_step.py                        # CPU: debug (B 256) and ViT-B-32 (B 16), fp32
    python tools/bench/train_step.py --device cuda          # GPU: ViT-B-32, B 256, bf16, MFU
    python tools/bench/train_step.py --quick --json /tmp/ts.json    # debug, B 16, seconds
Other options: --models, --batch, --steps S, --repeats R, --warmup W, --precision, --threads T, --vs-base, --ema,
--set KEY=VALUE (vlp config overrides, e.g. train.max_bad_steps=0), --retries K. The default CPU
run takes about 5 minutes on 2 cores. The table goes to stdout, progress to stderr; --json PATH
writes the rows, the environment and ``ratio_vs_open_clip`` (vlp / open_clip samples/s of
ViT-B-32 when measured, else of the first model).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import math
import sys
import tempfile
import time
import traceback
import warnings
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tools.bench.common import (
    CpuContention,
    format_table,
    isolated_or_status,
    median,
    print_environment,
    run_environment,
    run_quietest,
    synchronize,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]
SEED = 0
HEADLINE_MODEL = "ViT-B-32"
EMA_DECAY = 0.9999
# dense bf16 tensor-core peaks, TFLOP/s, matched against torch.cuda.get_device_name (first match wins)
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4), ("A100", 312.0))
DEFAULTS = {  # (batch, steps per repeat, repeats)
    ("cpu", "debug"): (256, 5, 5),
    ("cpu", "ViT-B-32"): (16, 2, 3),
    ("cuda", "debug"): (256, 20, 5),
    ("cuda", "ViT-B-32"): (256, 20, 5),
}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    batch: int
    steps: int
    repeats: int
    warmup: int
    device: str
    precision: str  # fp32 | bf16
    grad_checkpointing: bool = False
    patch_dropout: float = 0.0
    compile: bool = False
    vs_base: bool = False  # also time vlp without the three options above
    ema: bool = False  # also time vlp with train.ema on
    threads: int = 0
    overrides: tuple[str, ...] = ()


# ---------------------------------------------------------------------------------------------
# inside the measuring process


def vlp_trainer(case: Case, out_dir: str):
    from vlp.config import load_config
    from vlp.train.trainer import Trainer

    overrides = [
        f"model.name={case.model}", f"model.precision={case.precision}", f"train.device={case.device}",
        f"model.grad_checkpointing={str(case.grad_checkpointing).lower()}", f"model.patch_dropout={case.patch_dropout}",
        f"train.compile={str(case.compile).lower()}", f"train.output_dir={out_dir}", "train.steps=100000",
        "eval.tasks=[]", "data.val_shards=[]", f"data.batch_size={case.batch}", *case.overrides,
    ]  # fmt: skip
    torch.manual_seed(SEED)
    return Trainer(load_config(None, overrides))


def open_clip_side(case: Case, trainer):
    """open_clip's model (vlp's initial weights), loss, optimizer and schedule, as open_clip_train builds them."""
    import open_clip
    from open_clip_train.scheduler import cosine_lr

    t = trainer.cfg.train
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "initialized randomly" on the root logger
    model = open_clip.create_model(
        case.model, output_dict=True, force_patch_dropout=case.patch_dropout or None, device=trainer.env.device
    )
    model.load_state_dict(trainer.model.state_dict())
    if case.grad_checkpointing:
        model.set_grad_checkpointing()
    exclude = lambda n, p: p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n  # noqa: E731
    named = list(model.named_parameters())
    groups = [
        {"params": [p for n, p in named if exclude(n, p) and p.requires_grad], "weight_decay": 0.0},
        {"params": [p for n, p in named if not exclude(n, p) and p.requires_grad], "weight_decay": t.weight_decay},
    ]
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=tuple(t.betas), eps=t.eps)
    scheduler = cosine_lr(optimizer, t.lr, t.warmup_steps, t.steps)
    loss = open_clip.ClipLoss(local_loss=False, gather_with_grad=False, cache_labels=True, rank=0, world_size=1)
    train_model = torch.compile(model) if case.compile else model
    return train_model, optimizer, scheduler, loss


class _Loader:
    """What ``train_one_epoch`` reads of a loader: iteration, ``num_batches``, ``num_samples``."""

    def __init__(self, batch, steps: int):
        self.batch, self.num_batches, self.num_samples = batch, steps, steps * len(batch[0])

    def __iter__(self):
        return iter([self.batch] * self.num_batches)


class _Data:
    def __init__(self, batch, steps: int):
        self.dataloader = _Loader(batch, steps)

    def set_epoch(self, epoch: int) -> None:
        pass


def make_batches(trainer, case: Case):
    """The same pixels and tokens: vlp's uint8 batch and open_clip's normalised float32 one (pinned on CUDA)."""
    from vlp.models.registry import context_length, image_size

    g = torch.Generator().manual_seed(SEED)
    size, ctx = image_size(trainer.model), context_length(trainer.model)
    pixels = torch.randint(0, 256, (case.batch, 3, size, size), generator=g, dtype=torch.uint8)
    text = torch.randint(1, trainer.model.vocab_size - 1, (case.batch, ctx), generator=g)
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in (trainer.mean, trainer.std))
    images = (pixels.float() / 255 - mean) / std
    if case.device == "cuda":
        pixels, text, images = pixels.pin_memory(), text.pin_memory(), images.pin_memory()
    return {"image": pixels, "text": text, "caption": [""] * case.batch}, (images, text)


def forward_flops_per_sample(model, case: Case, device) -> float:
    """FLOPs of one training-mode forward per sample (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    from vlp.models.registry import context_length, image_size

    size, n = image_size(model), 2
    image = torch.randn(n, 3, size, size, device=device)
    text = torch.randint(1, 400, (n, context_length(model)), device=device)
    model.train()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(image, text)
    return counter.get_total_flops() / n


def count_cuda_syncs(fn) -> list[str]:
    """The synchronising CUDA calls ``fn()`` makes (torch's sync debug mode, as warnings)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]


def measure(case: Case) -> dict:
    """Warm-up, then R repeats of S steps per side (alternating which goes first)."""
    from open_clip_train.train import train_one_epoch

    if case.threads:
        torch.set_num_threads(case.threads)
    if case.compile:  # each side's first steps compile from scratch (the caches would serve the second side)
        from torch._functorch import config as functorch_config
        from torch._inductor import config as inductor_config

        inductor_config.fx_graph_cache = False
        functorch_config.enable_autograd_cache = False
    device = torch.device(case.device)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = vlp_trainer(case, str(Path(out_dir, "vlp")))
        oc_model, optimizer, scheduler, loss = open_clip_side(case, trainer)
        vlp_batch, oc_batch = make_batches(trainer, case)
        args = SimpleNamespace(
            device=str(device), precision="amp_bf16" if case.precision == "bf16" else "fp32", accum_freq=1,
            batch_size=case.batch, distill=False, skip_scheduler=False, horovod=False,
            grad_clip_norm=trainer.cfg.train.grad_clip or None, log_every_n_steps=100, rank=0, local_rank=0,
            world_size=1, wandb=False,
        )  # fmt: skip

        def vlp_runner(trainer):
            def run(steps: int) -> None:
                for _ in range(steps):
                    out = trainer.train_step([vlp_batch])
                float(out[0])  # the loss, read once per log interval

            return run

        def run_open_clip(steps: int) -> None:
            data = {"train": _Data(oc_batch, steps)}
            train_one_epoch(oc_model, data, loss, 0, optimizer, None, scheduler, None, args)

        def timed_run(fn, steps: int) -> float:
            synchronize(device)
            start = time.perf_counter()
            fn(steps)
            synchronize(device)
            return time.perf_counter() - start

        sides = {"vlp": vlp_runner(trainer), "open_clip": run_open_clip}
        if case.vs_base:
            plain = dataclasses.replace(case, grad_checkpointing=False, patch_dropout=0.0, compile=False)
            sides["vlp_base"] = vlp_runner(vlp_trainer(plain, str(Path(out_dir, "base"))))
        if case.ema:  # the same step with the weight EMA updated after it
            with_ema = dataclasses.replace(case, overrides=(*case.overrides, f"train.ema.decay={EMA_DECAY}"))
            ema_trainer = vlp_trainer(with_ema, str(Path(out_dir, "ema")))
            sides["vlp_ema"] = vlp_runner(ema_trainer)
        first = {name: timed_run(fn, case.warmup) for name, fn in sides.items()}
        times = {name: [] for name in sides}
        for r in range(case.repeats):
            for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
                times[name].append(timed_run(sides[name], case.steps))
        result = {"times_s": times, "warmup_s": first, "threads": torch.get_num_threads()}
        result["flops_per_sample"] = 3 * forward_flops_per_sample(trainer.model, case, device)
        result["params"] = sum(p.numel() for p in trainer.model.parameters())
        if case.ema:  # the update alone, 5 at a time: where steps are long the step-time ratio is within noise
            update = lambda n: [ema_trainer.ema.after_step(1) for _ in range(n)]  # noqa: E731
            result["ema_update_s"] = median([timed_run(update, 5) / 5 for _ in range(3)])
        if device.type == "cuda":
            result["vlp_syncs"] = count_cuda_syncs(lambda: trainer.train_step([vlp_batch]))
            result["gpu"] = torch.cuda.get_device_name(device)
    return result


def measure_or_error(case: Case) -> dict:
    try:
        return {"status": "ok", **measure(case)}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as e:
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# in the parent: run cases, report


def peak_tflops(args, gpu: str | None) -> float | None:
    if args.peak_tflops:
        return args.peak_tflops
    for key, value in PEAK_BF16_TFLOPS if gpu else ():
        if key in gpu:
            return value
    return None


def make_row(case: Case, result: dict, busy: float | None, args) -> dict:
    row = {"model": case.model, "batch": case.batch, "device": case.device, "precision": case.precision,
           "steps": case.steps, "repeats": case.repeats, "status": result["status"].splitlines()[0][:200],
           "others_cpu_share": None if busy is None else round(busy, 3)}  # fmt: skip
    row.update(grad_checkpointing=case.grad_checkpointing, patch_dropout=case.patch_dropout, compile=case.compile)
    if row["status"] != "ok":
        return row
    peak = peak_tflops(args, result.get("gpu"))
    row.update(threads=result["threads"], params=result["params"], flops_per_sample=result["flops_per_sample"])
    for side in result["times_s"]:
        sps = case.steps * case.batch / median(result["times_s"][side])
        tflops = sps * result["flops_per_sample"] / 1e12
        row[side] = {"samples_per_s": sps, "times_s": result["times_s"][side], "first_s": result["warmup_s"][side],
                     "tflops": tflops, "mfu": tflops / peak if peak else None}  # fmt: skip
    row["ratio"] = row["vlp"]["samples_per_s"] / row["open_clip"]["samples_per_s"]
    if "vlp_base" in row:
        row["speedup_vs_base"] = row["vlp"]["samples_per_s"] / row["vlp_base"]["samples_per_s"]
    if "vlp_ema" in row:  # step time with the EMA over step time without it
        row["ema_cost"] = row["vlp"]["samples_per_s"] / row["vlp_ema"]["samples_per_s"]
        row["ema_update_ms"] = 1e3 * result["ema_update_s"]
        row["ema_update_share"] = result["ema_update_s"] / (case.batch / row["vlp"]["samples_per_s"])
    row["peak_tflops"] = peak
    if "vlp_syncs" in result:
        row["vlp_syncs_per_step"] = result["vlp_syncs"]
    return row


def target_lines(rows: list[dict]) -> list[str]:
    """The issue's targets, with this run's numbers (reported, not enforced)."""
    lines = []
    for row in (r for r in rows if r["status"] == "ok"):
        name = f"{row['model']} B={row['batch']} {row['precision']} on {row['device']}"
        if row["device"] == "cpu":
            verdict = "met" if row["ratio"] >= 1.0 else "missed"
            lines.append(f"target {name}: >= 1.0x open_clip: {row['ratio']:.2f}x -> {verdict}")
        elif row["model"] == HEADLINE_MODEL and row["batch"] == 256 and row["precision"] == "bf16":
            mfu = row["vlp"]["mfu"]
            verdict = "met" if row["ratio"] >= 1.2 else "missed"
            lines.append(f"target {name}: >= 1.2x open_clip: {row['ratio']:.2f}x -> {verdict}")
            if mfu is None:
                lines.append(f"target {name}: MFU >= 40%: peak unknown (give --peak-tflops)")
            else:
                lines.append(f"target {name}: MFU >= 40%: {100 * mfu:.1f}% -> {'met' if mfu >= 0.4 else 'missed'}")
    return lines


def headline(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    pick = next((r for r in ok if r["model"] == HEADLINE_MODEL), ok[0] if ok else None)
    if pick is None:
        return {"ratio_vs_open_clip": None, "ratio_basis": None}
    return {"ratio_vs_open_clip": pick["ratio"], "ratio_basis": {k: pick[k] for k in ("model", "batch", "device")}}


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


COLUMNS = [
    ("model", "model"), ("batch", "B"), ("vlp_sps", "vlp samples/s"), ("oc_sps", "open_clip samples/s"),
    ("ratio", "vlp/open_clip"), ("first", "first step s (vlp/oc)"), ("tflops", "TFLOP/s (vlp/oc)"),
    ("mfu", "MFU % (vlp/oc)"), ("base", "vlp without the options"), ("busy", "others' CPU %"),
]  # fmt: skip


def display(row: dict) -> dict:
    if row["status"] != "ok":
        return {"model": row["model"], "batch": row["batch"], "vlp_sps": row["status"].split(":")[0]}
    v, o = row["vlp"], row["open_clip"]
    mfu = "" if v["mfu"] is None else f"{100 * v['mfu']:.1f} / {100 * o['mfu']:.1f}"
    return {
        **row,
        "vlp_sps": f"{v['samples_per_s']:.2f}",
        "oc_sps": f"{o['samples_per_s']:.2f}",
        "ratio": f"{row['ratio']:.2f}",
        "first": f"{v['first_s']:.1f} / {o['first_s']:.1f}",
        "tflops": f"{v['tflops']:.3g} / {o['tflops']:.3g}",
        "mfu": mfu,
        "base": f"{row['vlp_base']['samples_per_s']:.2f} ({row['speedup_vs_base']:.2f}x)" if "vlp_base" in row else "",
        "busy": fmt(row["others_cpu_share"] and 100 * row["others_cpu_share"], ".0f"),
    }


def report(rows: list[dict], env: dict, args) -> dict:
    git = env["vlp_git"]
    changed = f"{len(git['changed'])} files changed" if git["changed"] else "as committed"
    print_environment(env, f"vlp commit {git['commit']}; {changed}")
    first = rows[0]
    options = [f"grad_checkpointing={first['grad_checkpointing']}", f"patch_dropout={first['patch_dropout']}",
               f"compile={first['compile']}", *args.set]  # fmt: skip
    print(f"{first['device']}, {first['precision']}, {' '.join(options)}; median of the repeats")
    columns = [c for c in COLUMNS if c[0] != "base" or any("vlp_base" in r for r in rows)]
    print(format_table([display(r) for r in rows], columns, right=2))
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['model']}: {row['status']}")
            continue
        if "vlp_syncs_per_step" in row:
            syncs = row["vlp_syncs_per_step"]
            print(f"{row['model']}: vlp step host syncs: {len(syncs)}" + (f" ({syncs[0]})" if syncs else ""))
        if "ema_cost" in row:
            sps, cost, share = row["vlp_ema"]["samples_per_s"], row["ema_cost"], 100 * row["ema_update_share"]
            print(f"{row['model']}: weight EMA (decay {EMA_DECAY}): {sps:.2f} samples/s, step time {cost:.3f}x; "
                  f"the update alone {row['ema_update_ms']:.2f} ms, {share:.2f}% of a step")  # fmt: skip
    lines = target_lines(rows)
    print("\n".join(lines))
    return {"env": env, "args": vars(args), "rows": rows, **headline(rows), "targets": lines}


def plan(args) -> list[Case]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or (["debug"] if args.quick else ["debug", "ViT-B-32"] if device == "cpu" else ["ViT-B-32"])
    precision = args.precision or ("bf16" if device == "cuda" else "fp32")
    warmup = args.warmup if args.warmup is not None else (3 if args.compile else 1)
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    options = dict(grad_checkpointing=args.grad_checkpointing, patch_dropout=args.patch_dropout, compile=args.compile)
    options["vs_base"] = args.vs_base and any(options.values())
    options["ema"] = args.ema
    cases = []
    for model in models:
        batch, steps, repeats = (16, 2, 1) if args.quick else DEFAULTS.get((device, model), (16, 2, 3))
        sizes = dict(batch=args.batch or batch, steps=args.steps or steps, repeats=args.repeats or repeats)
        cases.append(Case(model=model, **sizes, warmup=warmup, device=device, precision=precision, **options,
                          threads=threads, overrides=tuple(args.set)))  # fmt: skip
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="debug model, B 16, 2 steps, 1 repeat, 1 thread")
    p.add_argument("--models", nargs="+", help="architectures (default CPU: debug ViT-B-32; CUDA: ViT-B-32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "bf16"), help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--batch", type=int, help="samples per step (default CPU: debug 256, ViT-B-32 16; CUDA 256)")
    p.add_argument("--steps", type=int, help="timed steps per repeat")
    p.add_argument("--repeats", type=int, help="timed repeats (the median is reported)")
    p.add_argument("--warmup", type=int, help="untimed steps first (default 1; with --compile 3)")
    p.add_argument("--grad-checkpointing", action="store_true", help="both sides: set_grad_checkpointing")
    p.add_argument("--patch-dropout", type=float, default=0.0, help="both sides: FLIP patch dropout fraction")
    p.add_argument("--compile", action="store_true", help="vlp train.compile; open_clip torch.compile(model)")
    p.add_argument("--vs-base", action="store_true", help="with an option above: also time vlp without it")
    p.add_argument("--ema", action="store_true", help="also time vlp with a weight EMA (train.ema); prints its cost")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; quick 1)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="vlp config override")
    p.add_argument("--peak-tflops", type=float, help="the device's dense bf16 peak for MFU (default: by name)")
    p.add_argument("--retries", type=int, default=0, help="re-run while others used > 10%% of the CPUs")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    contention = CpuContention()
    contention.start()
    rows = []
    for case in plan(args):
        print(f"  {case.model} B={case.batch} on {case.device} ...", file=sys.stderr)
        result, busy = run_quietest(isolated_or_status, measure_or_error, case, retries=args.retries)
        rows.append(make_row(case, result, busy, args))
        print(f"  {case.model}: {rows[-1]['status']}", file=sys.stderr)
    env = run_environment({"open_clip": importlib.metadata.version("open_clip_torch")}, REPO, ("vlp",), contention)
    result = report(rows, env, args)
    if args.json:
        write_json(args.json, result)
    ok = all(r["status"] == "ok" for r in rows)
    return 0 if ok and not any(math.isnan(r["ratio"]) for r in rows if "ratio" in r) else 1


if __name__ == "__main__":
    sys.exit(main())
