"""What only a GPU can show, measured on one GPU in under 8 minutes and written to one JSON.

Parts (each recorded with its status and seconds; a part that fails is recorded and the rest run):

* ``peak``: the device's bf16 matmul throughput, measured (square 8192 matmuls): the peak that MFU
  is taken against below, rather than the datasheet's.
* ``train_step``: tools/bench/train_step.py, ViT-B-32, bf16, batch 256: vlp's ``Trainer.train_step``
  against open_clip's ``train_one_epoch``: samples/s, their ratio, MFU of each against ``peak``.
* ``loss``: tools/bench/loss.py at global batch 65,536 in one process: vlp's tiled and gather losses
  against open_clip's ``ClipLoss``: time and peak memory, or an out-of-memory error, caught and
  recorded as ``OOM``.
* ``data``: tools/bench/data.py (vlp's training loader on real-sized JPEG shards; open_clip's
  webdataset pipeline too where its peer environment exists, else the reason it was left out), then
  the same loader's batches copied to the device and normalised there (``DeviceNormalize``, what
  ``vlp train`` does): images/s of the whole data path into the model's input.
* ``eval``: tools/bench/eval.py, ViT-B-32: vlp's zero-shot feature extraction (what ``vlp eval``
  runs) against CLIP_benchmark's loop: images/s, their ratio, logits agreement.
* ``train_run``: ``python -m vlp.train`` (``vlp train``) under torchrun: the ``debug`` model, bf16,
  on synthetic shapes shards, with ``train.backend=fsdp`` so that one GPU still runs a process group
  (nccl): the loss falls and the last checkpoint loads back into a model.

``--dry`` runs every part at toy sizes on the CPU (gloo instead of nccl, bf16 autocast where the CPU
has it), in under 2 minutes on 2 cores: ``tests/test_gpu_check.py`` runs it and checks the JSON.

Run from the repository root (open_clip_torch, whose wheel carries open_clip_train, and
clip-benchmark must be installed; webdataset 0.2.86 in the peer environment for open_clip's data
path, see tools/bench/data.py):
    python tools/gpu_check.py --out runs/gpu_check.json             # on the GPU
    python tools/gpu_check.py --dry --out /tmp/gpu_check.json       # CPU smoke test
Other options: --parts NAME ... (a subset), --work DIR (shards, logs and run folders; default: a
folder beside --out). Each benchmark's own report goes to WORK/logs/PART.log and WORK/PART.json;
a short table goes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

REPO = Path(__file__).resolve().parents[1]
PARTS = ("peak", "train_step", "loss", "data", "eval", "train_run")
# the GPU run's sizes, and --dry's
SIZES = {
    False: {
        "peak": {"n": 8192, "iters": 50, "dtype": "bfloat16"},
        "train_step": [
            "--models",
            "ViT-B-32",
            "--batch",
            "256",
            "--precision",
            "bf16",
            "--steps",
            "20",
            "--repeats",
            "3",
        ],
        "loss": ["--sizes", "65536", "--repeats", "3"],
        "data": ["--workers", "0", "4", "8", "--repeats", "1"],
        "data_device": {"workers": 8, "batch": 256, "batches": 12},
        "eval": ["--models", "ViT-B-32", "--images", "8192", "--repeats", "3"],
        "train_run": {"steps": 100, "batch": 128, "precision": "bf16", "samples": 4096, "shard": 512},
    },
    True: {
        "peak": {"n": 256, "iters": 3, "dtype": "bfloat16"},
        "train_step": ["--quick", "--precision", "bf16"],
        "loss": ["--quick", "--sizes", "512", "--repeats", "1"],
        "data": ["--quick", "--images", "32", "--batch", "16", "--workers", "0", "--no-peer"],
        "data_device": {"workers": 0, "batch": 16, "batches": 2},
        "eval": ["--quick", "--images", "32", "--batch", "16"],
        "train_run": {"steps": 12, "batch": 32, "precision": "bf16", "samples": 192, "shard": 48},
    },
}


class Context:
    def __init__(self, dry: bool, work: Path):
        self.dry, self.work = dry, work
        self.device = "cpu" if dry or not torch.cuda.is_available() else "cuda"
        self.sizes = SIZES[dry]
        self.results: dict = {}
        (work / "logs").mkdir(parents=True, exist_ok=True)


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@contextlib.contextmanager
def _logged(ctx: Context, name: str):
    """A benchmark's own report goes to WORK/logs/NAME.log, not to this script's table: stdout at the
    file-descriptor level, so that the processes it starts write there too."""
    sys.stdout.flush()
    saved = os.dup(1)
    with open(ctx.work / "logs" / f"{name}.log", "w", encoding="utf-8") as log:
        os.dup2(log.fileno(), 1)
        try:
            with contextlib.redirect_stdout(log):
                yield
        finally:
            sys.stdout.flush()
            os.dup2(saved, 1)
            os.close(saved)


def _bench(ctx: Context, name: str, module, argv: list[str]) -> dict:
    """Run ``tools/bench/<module>.py``'s ``main`` with ``argv`` and return its JSON report."""
    path = ctx.work / f"{name}.json"
    device = ["--device", ctx.device] if name != "data" else []
    with _logged(ctx, name):
        code = module.main([*argv, *device, "--json", str(path)])
    report = json.loads(path.read_text())
    report["exit_code"] = code
    return report


# ---------------------------------------------------------------------------------------------
# the parts


def part_peak(ctx: Context) -> dict:
    """Dense matmul throughput in the given dtype: 2 n^3 FLOPs per product, the median of 3 timings."""
    s = ctx.sizes["peak"]
    n, iters, dtype = s["n"], s["iters"], getattr(torch, s["dtype"])
    a = torch.randn(n, n, device=ctx.device, dtype=dtype)
    b = torch.randn(n, n, device=ctx.device, dtype=dtype)
    for _ in range(max(2, iters // 5)):  # clocks and kernels settle
        a @ b
    _sync(ctx.device)
    times = []
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iters):
            a @ b
        _sync(ctx.device)
        times.append(time.perf_counter() - start)
    seconds = sorted(times)[1]
    name = torch.cuda.get_device_name(0) if ctx.device == "cuda" else "cpu"
    tflops = 2 * n**3 * iters / seconds / 1e12
    return {"status": "ok", "tflops": tflops, "n": n, "dtype": s["dtype"], "device": name}


def part_train_step(ctx: Context) -> dict:
    from tools.bench import train_step

    argv = list(ctx.sizes["train_step"])
    peak = ctx.results.get("peak", {}).get("tflops")
    argv += ["--peak-tflops", f"{peak:.6g}"] if peak else []
    report = _bench(ctx, "train_step", train_step, argv)
    row = report["rows"][0]
    out = {"status": row["status"], "model": row["model"], "batch": row["batch"], "precision": row["precision"]}
    if row["status"] == "ok":
        v, o = row["vlp"], row["open_clip"]
        out.update(vlp_samples_per_s=v["samples_per_s"], open_clip_samples_per_s=o["samples_per_s"])
        out.update(ratio=row["ratio"], vlp_mfu=v["mfu"], open_clip_mfu=o["mfu"], peak_tflops=row["peak_tflops"])
        out.update(vlp_tflops=v["tflops"], flops_per_sample=row["flops_per_sample"])
    return out


def part_loss(ctx: Context) -> dict:
    from tools.bench import loss

    report = _bench(ctx, "loss", loss, list(ctx.sizes["loss"]))
    impls = {}
    for row in report["rows"]:
        impls[row["impl"]] = {k: row.get(k) for k in ("status", "ms", "peak_mib", "agree", "global_n")}
    n = report["rows"][0]["global_n"]
    return {
        "status": "ok",
        "global_batch": n,
        "impls": impls,
        "open_clip_over_tiled_time": report.get("ratio_vs_open_clip"),
        "open_clip_over_tiled_memory": report.get("memory_ratio_vs_open_clip"),
    }


def _data_on_device(ctx: Context, shards: str) -> dict:
    """vlp's training loader, each batch copied to the device and normalised there; images/s."""
    from tools.bench.data_runner import MEAN, STD, vlp_loader
    from vlp.data.transforms import DeviceNormalize

    s = ctx.sizes["data_device"]
    make = vlp_loader(shards, s["workers"], s["batch"], 224, draft=True)
    normalize = DeviceNormalize(MEAN, STD)
    taken, last = 0, None
    start = time.perf_counter()
    for images, _texts in make():
        last = normalize(images, ctx.device)
        taken += 1
        if taken == s["batches"]:
            break
    _sync(ctx.device)
    seconds = time.perf_counter() - start
    ok = last is not None and last.dtype == torch.float32 and last.device.type == ctx.device
    return {
        "images_per_s": taken * s["batch"] / seconds,
        "workers": s["workers"],
        "batch": s["batch"],
        "batches": taken,
        "normalised_on": str(last.device) if last is not None else None,
        "input_mean": float(last.mean()) if last is not None else None,
        "status": "ok" if ok and taken == s["batches"] else f"error: {taken} batches, last {last!r:.60}",
    }


def part_data(ctx: Context) -> dict:
    from tools.bench import data

    argv = [*ctx.sizes["data"], "--shard-dir", str(ctx.work / "data_shards")]
    if "--no-peer" not in argv and not (data.CACHE / "openclip-peer" / "bin" / "python").exists():
        argv.append("--no-peer")  # building open_clip's environment needs PyPI: not within this check's minutes
    report = _bench(ctx, "data", data, argv)
    loader = {f"{r['impl']} workers={r['workers']}": r["images_per_s"] for r in report["rows"]}
    return {
        "status": "ok",
        "loader_images_per_s": loader,
        "ratio_vs_open_clip": report.get("ratio_vs_open_clip"),
        "open_clip_left_out": report.get("peer_skipped"),
        "on_device": _data_on_device(ctx, report["shards"]),
    }


def part_eval(ctx: Context) -> dict:
    from tools.bench import eval as eval_bench

    report = _bench(ctx, "eval", eval_bench, list(ctx.sizes["eval"]))
    row = report["rows"][0]
    out = {"status": row["status"], "model": row["model"], "images": row["images"], "batch": row["batch"]}
    if row["status"] == "ok":
        out.update(
            vlp_images_per_s=row["vlp"]["images_per_s"],
            clip_benchmark_images_per_s=row["clip_benchmark"]["images_per_s"],
        )
        out.update(ratio=row["ratio"], agree=row["agree"], max_logit_diff=row["max_logit_diff"])
    return out


def _train_command(ctx: Context, shards: str, out: Path) -> list[str]:
    s = ctx.sizes["train_run"]
    sets = [
        "model.name=debug", f"model.precision={s['precision']}", "train.backend=fsdp", f"train.device={ctx.device}",
        f"data.train_shards={shards}", f"data.batch_size={s['batch']}", "data.workers=1", "data.shuffle_buffer=256",
        f"train.steps={s['steps']}", "train.lr=2e-3", "train.warmup_steps=2", "train.log_every=1",
        f"train.checkpoint_every={s['steps'] // 2}", "eval.tasks=[]", "data.val_shards=[]", f"train.output_dir={out}",
        "train.progress=off",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m", "vlp.train"]
    return cmd + [a for item in sets for a in ("--set", item)] + ["--overwrite"]


def part_train_run(ctx: Context) -> dict:
    """A short ``vlp train`` run through torchrun: nccl on the GPU (gloo with --dry)."""
    from vlp.checkpoint import resolve
    from vlp.data.shards import write_synthetic_shards
    from vlp.models.registry import build_loaded
    from vlp.train.logging import read_metrics

    s = ctx.sizes["train_run"]
    root = ctx.work / "train_run"
    info = write_synthetic_shards(
        root / "shards", s["samples"], seed=0, max_samples_per_shard=s["shard"], progress=False
    )
    out = root / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with open(ctx.work / "logs" / "train_run.log", "w", encoding="utf-8") as log:
        proc = subprocess.run(_train_command(ctx, str(root / "shards" / info["shards"]), out), cwd=REPO, env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=300)  # fmt: skip
    if proc.returncode != 0:
        tail = (ctx.work / "logs" / "train_run.log").read_text()[-400:]
        return {"status": f"error: vlp train exited {proc.returncode}: {tail}"}
    losses = [r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    head, tail = sum(losses[:3]) / 3, sum(losses[-3:]) / 3
    with warnings.catch_warnings():  # torch.distributed.checkpoint notes that no process group runs here
        warnings.simplefilter("ignore", UserWarning)
        found = resolve(str(out / "checkpoints"))
        model, _ = build_loaded(found)
    finite = all(torch.isfinite(p).all() for p in model.parameters())
    dist_backend = "gloo" if ctx.device == "cpu" else "nccl"
    return {
        "status": "ok" if tail < head and finite else "error: the loss did not fall or the weights are not finite",
        "steps": len(losses),
        "precision": s["precision"],
        "process_group": dist_backend,
        "first_losses_mean": head,
        "last_losses_mean": tail,
        "loss_fell": tail < head,
        "checkpoint": str(found.path),
        "checkpoint_loads": finite,
        "params": sum(p.numel() for p in model.parameters()),
    }


PART_FNS = {
    "peak": part_peak,
    "train_step": part_train_step,
    "loss": part_loss,
    "data": part_data,
    "eval": part_eval,
    "train_run": part_train_run,
}


# ---------------------------------------------------------------------------------------------
# report


def _f(value, spec: str, scale: float = 1.0) -> str:
    return "" if value is None else format(value * scale, spec)


def _loss_cell(row: dict) -> str:
    if row["status"] != "ok":
        return row["status"]
    return f"{_f(row['ms'], '.0f')} ms {_f(row['peak_mib'], '.0f')} MiB"


def summary_rows(parts: dict) -> list[dict]:
    """One line per part for the printed table."""
    rows = []
    for name, r in parts.items():
        status = r.get("status", "")
        if name == "peak" and status == "ok":
            what = f"{r['tflops']:.1f} TFLOP/s {r['dtype']} matmul ({r['device']})"
        elif name == "train_step" and status == "ok":
            mfu = f", MFU {_f(r['vlp_mfu'], '.1%')} vs {_f(r['open_clip_mfu'], '.1%')}" if r.get("vlp_mfu") else ""
            what = f"{r['model']} B={r['batch']}: {r['vlp_samples_per_s']:.0f} vs "
            what += f"{r['open_clip_samples_per_s']:.0f} samples/s = {r['ratio']:.2f}x open_clip{mfu}"
        elif name == "loss" and status == "ok":
            cells = [f"{k} {_loss_cell(v)}" for k, v in r["impls"].items()]
            what = f"N={r['global_batch']}: " + "; ".join(cells)
        elif name == "data" and status == "ok":
            dev = r["on_device"]
            what = f"loader {max(r['loader_images_per_s'].values()):.0f} images/s; to the device and normalised: "
            what += f"{dev['images_per_s']:.0f} images/s ({dev['workers']} workers)"
        elif name == "eval" and status == "ok":
            what = f"{r['model']}: {r['vlp_images_per_s']:.0f} vs {r['clip_benchmark_images_per_s']:.0f} images/s "
            what += f"= {r['ratio']:.2f}x CLIP_benchmark"
        elif name == "train_run" and status == "ok":
            what = f"{r['steps']} steps {r['precision']} {r['process_group']}: loss {r['first_losses_mean']:.3f} -> "
            what += f"{r['last_losses_mean']:.3f}; checkpoint loads: {r['checkpoint_loads']}"
        else:
            what = status.splitlines()[0][:100] if status else ""
        rows.append(
            {"part": name, "status": "ok" if status == "ok" else "FAILED", "s": f"{r['seconds']:.0f}", "what": what}
        )
    return rows


def run(parts: list[str], dry: bool, out: Path, work: Path) -> dict:
    ctx = Context(dry, work)
    started = time.perf_counter()
    for name in parts:
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        try:
            result = PART_FNS[name](ctx)
        except Exception as e:  # recorded; the next part still runs
            result = {"status": f"error: {type(e).__name__}: {e}", "traceback": traceback.format_exc()[-2000:]}
        if "out of memory" in str(result.get("status", "")).lower():
            result["status"] = "OOM"
        result["seconds"] = round(time.perf_counter() - t0, 1)
        ctx.results[name] = result
        print(f"gpu_check: {name}: {result['status'].splitlines()[0][:160]} ({result['seconds']} s)", file=sys.stderr)
    report = {
        "dry": dry,
        "device": ctx.device,
        "gpu": torch.cuda.get_device_name(0) if ctx.device == "cuda" else None,
        "torch": torch.__version__,
        "seconds": round(time.perf_counter() - started, 1),
        "work": str(work),
        "parts": ctx.results,
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2, default=str) + "\n")
    from tools.bench.common import format_table

    print(f"gpu_check on {report['gpu'] or 'cpu'}{' (--dry: toy sizes)' if dry else ''}, {report['seconds']} s")
    columns = [("part", "part"), ("status", "status"), ("s", "s"), ("what", "result")]
    print(format_table(summary_rows(ctx.results), columns))
    print(f"wrote {out}")
    return report


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry", action="store_true", help="every part at toy sizes on the CPU (gloo), < 2 minutes")
    p.add_argument("--out", type=Path, default=Path("gpu_check.json"), help="the JSON report")
    p.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS), help="run only these parts")
    p.add_argument("--work", type=Path, help="shards, logs, run folders (default: OUT's folder/gpu_check_work)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    work = args.work or args.out.parent / "gpu_check_work"
    if not args.dry and not torch.cuda.is_available():
        print("gpu_check: no CUDA device; run with --dry for the CPU smoke test", file=sys.stderr)
        return 2
    report = run(args.parts, args.dry, args.out, work)
    return 0 if all(p["status"] == "ok" for p in report["parts"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
