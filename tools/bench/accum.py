"""Benchmark exact contrastive accumulation: vlp's forward_backward against open_clip's --accum-freq.

What it measures: the forward and backward of one optimizer step of a CLIP model (one process)
at a fixed global batch G (default 256) split into k = 1, 4 and 16 micro-batches of G/k:

* vlp: ``vlp.train.step.forward_backward``; for k > 1 a no-grad forward of every micro-batch
  (recording the RNG state), the loss on the G cached features and its gradient with respect to
  them, then a re-forward of each micro-batch from its recorded RNG state and a backward of the
  surrogate sum(output * cached gradient).
* open_clip: ``open_clip_train.train.train_one_epoch`` itself with ``args.accum_freq = k``, fed a
  loader that yields the k micro-batches as (images, texts), i.e. one optimizer step per call.
  Its algorithm: a no-grad forward of every micro-batch, then k re-forwards, each followed by the
  whole loss over the G features (the others cached) and a backward. The optimizer it is given
  only clears gradients (no update) and the scheduler is skipped, so both sides time forward +
  backward; its per-step logging (a few ``.item()``, one ``logging.info``) stays in.

Loss: vlp ``Objective(LossConfig())`` (InfoNCE, impl gather); open_clip ``ClipLoss()``.

Columns:
* ms/sample: the median over R repeats (default 5; --quick 1) of one step's wall time, divided
  by G. Each step starts with the gradients freed (set to None), as both training loops do.
* peak extra MiB: the peak memory of the first full-size step above what the process held just
  before it (libraries, model, inputs; the gradients are freed before, so they count). CPU: the
  resident-set high-water mark after ``clear_refs`` (tools/bench/common.py), every page counted
  whichever allocator or thread touched it; CUDA: ``max_memory_allocated``. Before that step a
  warm-up step (micro-batches of 2 samples) loads the kernels.
* grad vs k=1: the largest relative difference, over parameters other than the logit scale, of
  the gradient norm from vlp's k = 1 step (the plain large-batch gradient); scale grad / k=1:
  the logit scale's gradient over vlp's k = 1 one. open_clip adds the logit scale's gradient in
  every re-forward, so k times (models without dropout; with dropout its re-forwards draw new
  masks, vlp's replay the cached ones).
* time / k=1: ms/sample over the same impl's at k = 1 (the price of accumulating).
* ratios: memory vlp / open_clip and time vlp / open_clip at each k (< 1: vlp is lighter/faster).

Every (impl, k) runs in a fresh process so peaks do not mix (--quick: every case shares one
process with one torch thread, as start-up dominates there and it must stay fast on a busy
machine); others' CPU % is the share of the machine's CPUs other processes used meanwhile
(--retries K re-runs a case while it is above 10%). Several torch threads on CPUs that other
processes keep busy slow down by much more than their share (spinning OpenMP threads): compare
timings only from quiet runs, or use --threads 1.

Run from the repository root:
    python tools/bench/accum.py                                          # CPU, debug model, G = 256
    python tools/bench/accum.py --model ViT-B-32 --device cuda           # GPU
    python tools/bench/accum.py --quick --out /tmp/accum.json            # G = 16, seconds
Other options: --global-batch G, --accum K ..., --repeats R, --precision fp32|amp_bf16, --threads T,
--retries K.
The table goes to stdout, progress to stderr, the JSON (rows, ratios, environment) to --out
(default runs/bench/accum.json).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import gc
import importlib.metadata
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch

from tools.bench.common import (
    MIB,
    CpuContention,
    PeakMemory,
    format_table,
    median,
    print_environment,
    run_environment,
    run_isolated,
    run_quietest,
    timed,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]
IMPLS = ("vlp", "open_clip")
ACCUM = (1, 4, 16)
GLOBAL_BATCH = {"full": 256, "quick": 16}
WARMUP_MICRO = 2
SEED = 0


@dataclasses.dataclass(frozen=True)
class Case:
    impl: str
    accum: int
    global_batch: int
    model: str = "debug"
    device: str = "cpu"
    precision: str = "fp32"
    repeats: int = 5
    threads: int = 0  # torch CPU threads (0: torch's default)

    @property
    def micro(self) -> int:
        return self.global_batch // self.accum


# ---------------------------------------------------------------------------------------------
# inside the measuring process


def make_micro_batches(model, case: Case, micro: int, device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``accum`` (images, texts) pairs of ``micro`` random samples each, on the device."""
    from vlp.models.registry import context_length, image_size

    g = torch.Generator().manual_seed(SEED)
    n, size, ctx = micro * case.accum, image_size(model), context_length(model)
    images = torch.randn(n, 3, size, size, generator=g).to(device)
    texts = torch.randint(1, model.vocab_size - 1, (n, ctx), generator=g).to(device)
    return list(zip(images.split(micro), texts.split(micro)))


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type, dtype=torch.bfloat16)


class _Loader:
    """What ``train_one_epoch`` reads of a loader: iteration, ``num_batches``, ``num_samples``."""

    def __init__(self, pairs):
        self.pairs, self.num_batches, self.num_samples = pairs, len(pairs), sum(len(i) for i, _ in pairs)

    def __iter__(self):
        return iter(self.pairs)


class _Data:
    def __init__(self, pairs):
        self.dataloader = _Loader(pairs)

    def set_epoch(self, epoch):
        pass


class _GradientsOnly:
    """The optimizer handed to ``train_one_epoch``: clears gradients, never updates (fwd+bwd only)."""

    def __init__(self, params):
        self.params, self.param_groups = list(params), [{"lr": 0.0}]

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def step(self):
        pass


def vlp_step_fn(model, case: Case, device):
    from vlp.config import LossConfig
    from vlp.losses import Objective
    from vlp.train.step import forward_backward

    objective, autocast = Objective(LossConfig()), autocast_for(case.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=False)

    def step(pairs):
        model.zero_grad(set_to_none=True)
        micro = [{"image": i, "text": t, "caption": [""] * len(i)} for i, t in pairs]
        forward_backward(model, objective, micro, device=device, autocast=autocast, scaler=scaler)

    return step


def open_clip_step_fn(model, case: Case, device):
    from open_clip import ClipLoss
    from open_clip_train.train import train_one_epoch

    loss, optimizer = ClipLoss(), _GradientsOnly(model.parameters())

    def step(pairs):
        args = SimpleNamespace(
            device=str(device),
            precision=case.precision,
            accum_freq=case.accum,
            batch_size=len(pairs[0][0]),
            distill=False,
            skip_scheduler=True,
            horovod=False,
            grad_clip_norm=None,
            log_every_n_steps=1,
            rank=0,
            local_rank=0,
            world_size=1,
            wandb=False,
        )
        train_one_epoch(model, {"train": _Data(pairs)}, loss, 0, optimizer, None, None, None, args)

    return step


def grad_summary(model) -> dict:
    norms = {n: p.grad.float().norm().item() for n, p in model.named_parameters() if p.grad is not None}
    return {"grad_norms": norms, "scale_grad": model.logit_scale.grad.item()}


def measure(case: Case) -> dict:
    """Warm-up step, the first full-size step (peak memory, gradients), then R timed steps."""
    from vlp.models.registry import build_model

    device = torch.device(case.device)
    torch.manual_seed(SEED)
    model, _, _ = build_model(case.model, device=device)
    model.train()
    step = (vlp_step_fn if case.impl == "vlp" else open_clip_step_fn)(model, case, device)
    step(make_micro_batches(model, case, WARMUP_MICRO, device))
    pairs = make_micro_batches(model, case, case.micro, device)
    model.zero_grad(set_to_none=True)
    gc.collect()
    probe = PeakMemory(device)
    probe.start()
    first_s, _ = timed(lambda: step(pairs), device)
    out = {"peak_bytes": probe.extra(), "mem_method": probe.method, "first_s": first_s, **grad_summary(model)}
    out["threads"] = torch.get_num_threads()
    out["times_s"] = [timed(lambda: step(pairs), device)[0] for _ in range(case.repeats)]
    return out


def measure_all(cases: list[Case]) -> list[dict]:
    """Entry of a fresh process: each case, its failure (OOM, error) as its status."""
    if cases[0].threads:
        torch.set_num_threads(cases[0].threads)
    results = []
    for case in cases:
        try:
            results.append({"status": "ok", **measure(case)})
        except torch.cuda.OutOfMemoryError:
            torch.cuda.empty_cache()
            results.append({"status": "OOM"})
        except Exception as e:
            traceback.print_exc()
            results.append({"status": f"error: {type(e).__name__}: {e}"})
    return results


# ---------------------------------------------------------------------------------------------
# in the parent: run cases, compare, report


def isolated_chunk(chunk: list[Case]) -> list[dict]:
    """The chunk's results from one fresh process; where that process fails, its status for every case."""
    status, results = run_isolated(measure_all, chunk)
    return results if status == "ok" else [{"status": f"{status}: {results}"} for _ in chunk]


def make_row(case: Case, result: dict, busy: float | None) -> dict:
    row = {"impl": case.impl, "accum_steps": case.accum, "micro_batch": case.micro, "global_batch": case.global_batch}
    row.update(model=case.model, device=case.device, precision=case.precision, repeats=case.repeats)
    row["status"] = result["status"].splitlines()[0][:200]
    row["others_cpu_share"] = None if busy is None else round(busy, 3)
    if row["status"] != "ok":
        return row
    step_s = median(result["times_s"])
    row.update(ms_per_step=1000 * step_s, ms_per_sample=1000 * step_s / case.global_batch)
    row.update(first_ms=1000 * result["first_s"], times_s=result["times_s"])
    row.update(peak_mib=result["peak_bytes"] / MIB, mem_method=result["mem_method"], threads=result["threads"])
    row.update(grad_norms=result["grad_norms"], scale_grad=result["scale_grad"])
    return row


def compare(rows: list[dict]) -> list[dict]:
    """Gradients against vlp's k = 1 step; memory and time ratios vlp / open_clip at each k."""
    ok = [r for r in rows if r["status"] == "ok"]
    ref = next((r for r in ok if r["impl"] == "vlp" and r["accum_steps"] == 1), None)
    for row in ok:
        own = next((r for r in ok if r["impl"] == row["impl"] and r["accum_steps"] == 1), None)
        if own is not None:
            row["time_vs_k1"] = row["ms_per_sample"] / own["ms_per_sample"]
        if ref is None:
            continue
        want, got = ref["grad_norms"], row["grad_norms"]
        errs = [abs(got[n] - want[n]) / max(want[n], 1e-30) for n in want if n != "logit_scale"]
        row["grad_rel_err_vs_k1"] = max(errs)
        row["scale_grad_ratio_vs_k1"] = row["scale_grad"] / ref["scale_grad"]
    ratios = []
    for k in dict.fromkeys(r["accum_steps"] for r in rows):
        at_k = {r["impl"]: r for r in rows if r["accum_steps"] == k and r["status"] == "ok"}
        if "vlp" in at_k and "open_clip" in at_k:
            vlp, oc = at_k["vlp"], at_k["open_clip"]
            mem = vlp["peak_mib"] / max(oc["peak_mib"], 1 / MIB)
            ratios.append(
                {"accum_steps": k, "mem_ratio": mem, "time_ratio": vlp["ms_per_sample"] / oc["ms_per_sample"]}
            )
    return ratios


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


COLUMNS = [
    ("accum_steps", "k"),
    ("micro_batch", "micro B"),
    ("impl", "impl"),
    ("ms_per_sample", "ms/sample"),
    ("vs_k1", "time / k=1"),
    ("peak", "peak extra MiB"),
    ("grad", "grad vs k=1"),
    ("scale", "scale grad / k=1"),
    ("busy", "others' CPU %"),
]
RATIO_COLUMNS = [("accum_steps", "k"), ("mem_ratio", "memory vlp/open_clip"), ("time_ratio", "time vlp/open_clip")]


def display(row: dict) -> dict:
    ok = row["status"] == "ok"
    return {
        **row,
        "ms_per_sample": fmt(row.get("ms_per_sample"), ".3f") if ok else row["status"].split(":")[0],
        "vs_k1": fmt(row.get("time_vs_k1"), ".2f"),
        "peak": fmt(row.get("peak_mib"), ".1f"),
        "grad": fmt(row.get("grad_rel_err_vs_k1"), ".1e"),
        "scale": fmt(row.get("scale_grad_ratio_vs_k1"), ".2f"),
        "busy": "" if row["others_cpu_share"] is None else f"{100 * row['others_cpu_share']:.0f}",
    }


def report(rows: list[dict], ratios: list[dict], env: dict, args) -> None:
    git = env["vlp_git"]
    changed = "changed" if git["changed"] else "as committed"
    print_environment(env, f"vlp commit {git['commit']}; vlp/train/step.py {changed}")
    first = rows[0]
    methods = ", ".join(sorted({r["mem_method"] for r in rows if "mem_method" in r})) or "n/a"
    print(f"model {first['model']} on {first['device']}, {first['precision']}, global batch {first['global_batch']}")
    print(f"peak memory: {methods}")
    print(format_table([display(r) for r in rows], COLUMNS, right=3))
    print()
    shown = [{k: fmt(v, ".2f") if k != "accum_steps" else v for k, v in r.items()} for r in ratios]
    print(format_table(shown, RATIO_COLUMNS, right=1))
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['impl']} k={row['accum_steps']}: {row['status']}")


def plan(args) -> list[list[Case]]:
    """Chunks of cases, each chunk measured in one fresh process."""
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    g = args.global_batch or GLOBAL_BATCH["quick" if args.quick else "full"]
    repeats = args.repeats or (1 if args.quick else 5)
    for k in args.accum:
        if g % k:
            raise SystemExit(f"--global-batch {g} is not divisible by accum_steps {k}")
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    common = dict(global_batch=g, model=args.model, device=device, precision=args.precision, repeats=repeats)
    cases = [Case(impl, k, **common, threads=threads) for k in args.accum for impl in IMPLS]
    return [cases] if args.quick else [[case] for case in cases]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="global batch 16, 1 repeat, 1 thread, one process")
    p.add_argument("--model", default="debug", help="architecture (vlp or open_clip name)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("fp32", "amp_bf16"), default="fp32")
    p.add_argument("--global-batch", type=int, help="samples per optimizer step (default 256; quick 16)")
    p.add_argument("--accum", type=int, nargs="+", default=list(ACCUM), help="accum_steps values (default 1 4 16)")
    p.add_argument("--repeats", type=int, help="timed steps (default 5; quick 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads per process (default: torch's; quick 1)")
    p.add_argument("--retries", type=int, default=0, help="re-run a case while other processes used > 10%% of the CPUs")
    p.add_argument("--out", "--json", type=Path, default=Path("runs/bench/accum.json"), help="JSON report")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    contention = CpuContention()
    contention.start()
    outcome = {}
    for chunk in plan(args):
        results, busy = run_quietest(isolated_chunk, chunk, retries=args.retries)
        for case, result in zip(chunk, results):
            outcome[case] = make_row(case, result, busy)
            print(f"  {case.impl} k={case.accum}: {outcome[case]['status']}", file=sys.stderr)
    rows = sorted(outcome.values(), key=lambda r: (r["accum_steps"], IMPLS.index(r["impl"])))
    ratios = compare(rows)
    env = run_environment(
        {"open_clip": importlib.metadata.version("open_clip_torch")}, REPO, ("vlp/train/step.py",), contention
    )
    report(rows, ratios, env, args)
    result = {"env": env, "args": {**vars(args), "out": str(args.out)}, "rows": rows, "ratios": ratios}
    write_json(args.out, result)
    print(f"wrote {args.out.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
