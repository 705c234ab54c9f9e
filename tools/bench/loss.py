"""Benchmark vlp's CLIP loss against open_clip's ClipLoss: forward+backward time and peak extra memory.

What it measures: for each global batch N and implementation, one forward+backward of the
symmetric InfoNCE loss on random L2-normalised fp32 N x D features (D = 512) with logit scale
100, every feature tensor and the scale being leaves that require grad:

* wall time: the median of R repeats after one warm-up pass at the same size (R = 3, or 1 from
  N = 16384 on CPU; --repeats overrides). With --world the time of a repeat is the slowest rank's.
* peak extra memory: the peak memory of the first full-size forward+backward above what the
  process held just before it (inputs, libraries); with --world the maximum over ranks.
* implementations: vlp ``clip_loss`` impl=gather, impl=tiled (tile 1024) and, with --world only,
  impl=grouped (group_size 2); open_clip ``ClipLoss``: in one process the plain loss, with --world
  the exact mode (local_loss=True, gather_with_grad=True: B x N logits per rank) and the default
  non-local mode (local_loss=False: N x N logits on every rank).
* ratios against open_clip (with --world its exact mode): memory = open_clip / vlp (> 1: vlp uses
  less), time = vlp / open_clip (< 1: vlp is faster).
* CPU ms: process CPU time of a repeat, all threads (and ranks) summed; others' CPU %: the share
  of the machine's CPUs that other processes used meanwhile (timings taken while it is well above
  0 are slowed by them; --retries K re-runs such a case up to K times and keeps the quietest).
* agree (✓/✗): the vlp loss equals open_clip's on the same features to 1e-4 relative and, where
  both define the same per-rank gradient (gather, tiled), so do the norms of the feature gradients
  and the logit-scale gradient (1e-3 relative). grouped is a different objective (the mean of
  per-group losses) and is checked against open_clip run on each group, loss only.

How memory is measured (tools/bench/common.py): every measurement runs in a fresh process (one,
or W gloo processes with --world; --quick saves start-up time by measuring all sizes of an impl
in one process, smallest first), after a tiny warm-up at 256 rows that loads kernels and
creates process groups. On CPU the probe then returns free heap pages to the OS (gc, glibc
malloc_trim), resets the kernel's resident-set high-water mark (``5 > /proc/self/clear_refs``)
and reads VmRSS; after the pass, peak extra = VmHWM - that VmRSS. Every page torch touches is
counted whichever thread or allocator touched it, so a dense N x N fp32 logit matrix (1 GiB at
N = 16384) shows in full, while the tiled path shows only its tiles and N x D gradients. (Where
clear_refs is unavailable the increase of ``ru_maxrss`` is used.) On CUDA the probe is
``max_memory_allocated`` after ``reset_peak_memory_stats``, minus the allocated inputs; a
``torch.cuda.OutOfMemoryError`` is reported as OOM. On CPU a dense case whose estimated memory
exceeds what the machine has available is skipped rather than run into the OOM killer.

Run from the repository root:
    python tools/bench/loss.py                  # one process: CPU N = 4096 8192 16384, CUDA 16384 32768 65536
    python tools/bench/loss.py --world 4        # 4 gloo processes on CPU, B = 4096 rows per rank
    python tools/bench/loss.py --quick --json /tmp/loss.json    # N = 1024 2048 (--world: B = 512)
Other options: --sizes N ..., --batch B, --repeats R, --device auto|cpu|cuda, --tile, --group-size,
--retries K. The default CPU runs take about 2.5 (single) and 4.5 (--world 4) minutes on 2 cores.
The table goes to stdout, progress to stderr; --json PATH writes the rows, the environment and
``ratio_vs_open_clip`` (open_clip time / vlp tiled time at the largest N) and
``memory_ratio_vs_open_clip`` (open_clip peak / vlp tiled peak at that N).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import sys
import time
import traceback
import warnings
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch
import torch.distributed as dist
import torch.nn.functional as F

from tools.bench.common import (
    BUSY_SHARE,
    MIB,
    CpuContention,
    PeakMemory,
    available_memory_bytes,
    format_table,
    median,
    print_environment,
    run_environment,
    run_isolated,
    run_quietest,
    spawn_gloo,
    timed,
    write_json,
)

REPO = Path(__file__).resolve().parents[2]
DIM, SCALE, SEED = 512, 100.0, 0
LOSS_RTOL, GRAD_RTOL = 1e-4, 1e-3
WARMUP_ROWS = 256
SINGLE_IMPLS = ("vlp gather", "vlp tiled", "open_clip")
WORLD_IMPLS = ("vlp gather", "vlp tiled", "vlp grouped", "open_clip local", "open_clip non-local")
REFERENCE = {"single": "open_clip", "gloo": "open_clip local"}
GRAD_COMPARABLE = ("vlp gather", "vlp tiled")
SIZES = {"cpu": (4096, 8192, 16384), "cuda": (16384, 32768, 65536), "quick": (1024, 2048)}
WORLD_BATCH = {"full": 4096, "quick": 512}
# fp32 rows x N logit-sized matrices at the peak of a dense loss (measured on CPU: 4.1 to 5.1)
DENSE_MATRICES = {"vlp gather": 5.5, "open_clip": 4.5, "open_clip local": 4.5, "open_clip non-local": 4.5}


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: ``impl`` on ``world`` processes of ``batch`` rows each."""

    impl: str
    batch: int
    world: int = 1
    device: str = "cpu"
    dim: int = DIM
    tile: int = 1024
    group_size: int = 2
    repeats: int = 3
    seed: int = SEED

    @property
    def global_n(self) -> int:
        return self.batch * self.world

    @property
    def mode(self) -> str:
        return "gloo" if self.world > 1 else "single"


# ---------------------------------------------------------------------------------------------
# inside the measuring process


def make_features(n: int, dim: int, seed: int):
    """The global batch: random L2-normalised image and text features, N x D each."""
    g = torch.Generator().manual_seed(seed)
    img_ND = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    txt_ND = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
    return img_ND, txt_ND


def leaf_inputs(case: Case, rank: int, batch: int):
    """This rank's ``batch`` rows of the global features and the logit scale, leaves with grad."""
    img_ND, txt_ND = make_features(batch * case.world, case.dim, case.seed)
    rows = slice(rank * batch, (rank + 1) * batch)
    img_BD = img_ND[rows].to(case.device, copy=True).requires_grad_()
    txt_BD = txt_ND[rows].to(case.device, copy=True).requires_grad_()
    scale = torch.tensor(SCALE, device=case.device, requires_grad=True)
    return img_BD, txt_BD, scale


def build_loss(case: Case):
    """``fn(img_BD, txt_BD, scale) -> scalar``; imports only the library it needs."""
    if case.impl.startswith("vlp"):
        from vlp.losses import clip_loss

        kwargs = {
            "vlp gather": dict(impl="gather"),
            "vlp tiled": dict(impl="tiled", tile_size=case.tile),
            "vlp grouped": dict(impl="grouped", group_size=case.group_size),
        }[case.impl]
        return functools.partial(clip_loss, **kwargs)
    from open_clip import ClipLoss

    rank, world = (dist.get_rank(), dist.get_world_size()) if case.world > 1 else (0, 1)
    return ClipLoss(local_loss=case.impl == "open_clip local", gather_with_grad=True, rank=rank, world_size=world)


def fwd_bwd(loss_fn, img_BD, txt_BD, scale) -> torch.Tensor:
    for leaf in (img_BD, txt_BD, scale):
        leaf.grad = None
    loss = loss_fn(img_BD, txt_BD, scale)
    loss.backward()
    return loss.detach()


def measure(case: Case, rank: int = 0) -> dict:
    """Warm up small, then peak extra memory of the first full-size pass, then R timed repeats."""
    device = torch.device(case.device)
    barrier = dist.barrier if case.world > 1 else (lambda: None)
    loss_fn = build_loss(case)
    fwd_bwd(loss_fn, *leaf_inputs(case, rank, batch=max(WARMUP_ROWS // case.world, 1)))
    img_BD, txt_BD, scale = leaf_inputs(case, rank, batch=case.batch)
    step = functools.partial(fwd_bwd, loss_fn, img_BD, txt_BD, scale)
    probe = PeakMemory(device)
    barrier()
    probe.start()
    first_s, loss = timed(step, device)
    out = {"peak_bytes": probe.extra(), "mem_method": probe.method, "first_s": first_s, "loss": loss.item()}
    out.update(grad_img=img_BD.grad.norm().item(), grad_txt=txt_BD.grad.norm().item(), grad_scale=scale.grad.item())
    out["times_s"], out["cpu_s"] = [], []
    for _ in range(case.repeats):
        barrier()
        cpu_start = time.process_time()
        out["times_s"].append(timed(step, device)[0])
        out["cpu_s"].append(time.process_time() - cpu_start)
    return out


def measure_or_oom(case: Case) -> dict:
    """``measure`` with its failure as the status: OOM, or the error (traceback on stderr)."""
    try:
        return {"status": "ok", **measure(case)}
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()
        return {"status": "OOM"}
    except Exception as e:
        if "can't allocate memory" in str(e):
            return {"status": "OOM"}
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {e}"}


def single_entry(cases: list[Case]) -> list[dict]:
    """Entry of a fresh process measuring single-process cases one after the other."""
    return [measure_or_oom(case) for case in cases]


def rank_entry(rank: int, world: int, case_fields: dict) -> dict:
    """Entry of each gloo rank measuring one multi-process case."""
    # open_clip 3.3 gathers with torch.distributed.nn.all_gather, deprecated in this torch
    warnings.filterwarnings("ignore", message=r".*torch\.distributed\.nn\.functional\.all_gather is deprecated")
    return {"status": "ok", **measure(Case(**case_fields), rank)}


# ---------------------------------------------------------------------------------------------
# in the parent: run cases, check agreement, report


def estimate_bytes(case: Case) -> int:
    """Rough upper bound on the peak extra memory of one process (dense cases; tiles are small)."""
    rows = case.global_n if case.impl in ("open_clip", "open_clip non-local") else case.batch
    matrices = DENSE_MATRICES.get(case.impl, 0)
    return int(matrices * rows * case.global_n * 4) + 8 * case.global_n * case.dim * 4


def skip_reason(case: Case) -> str | None:
    """Why a CPU case is not run: its estimate exceeds the memory available now."""
    available = available_memory_bytes()
    need = estimate_bytes(case) * case.world
    if case.device != "cpu" or available is None or need <= 0.9 * available:
        return None
    return f"skipped: needs ~{need / 2**30:.1f} GiB, {available / 2**30:.1f} GiB available"


def run_chunk(chunk: list[Case]) -> list[tuple[str, list[dict]]]:
    """(status, per-rank results) of each case; the chunk shares one fresh process (or, with
    --world, one set of gloo processes for its single case)."""
    reasons = [skip_reason(case) for case in chunk]
    if chunk[0].world > 1:
        if reasons[0]:
            return [(reasons[0], [])]
        status, results = spawn_gloo(rank_entry, chunk[0].world, dataclasses.asdict(chunk[0]))
        return [(status, results if status == "ok" else [])]
    runnable = [case for case, reason in zip(chunk, reasons) if reason is None]
    status, results = run_isolated(single_entry, runnable) if runnable else ("ok", [])
    if status != "ok":
        status = f"{status}: {results}"
    answers = iter(results if status == "ok" else [])
    out = []
    for reason in reasons:
        result = None if reason else next(answers, None)
        if reason or result is None:
            out.append((reason or status, []))
        else:
            out.append((result["status"], [result] if result["status"] == "ok" else []))
    return out


def execute(groups: list[list[Case]], share_process: bool, retries: int = 0) -> dict:
    """Run every case, each in fresh processes, or (``share_process``) every size of an impl in
    one process, smallest first. Returns {case: (status, per-rank results, busy share)}, the busy
    share being the part of the CPUs other processes used meanwhile."""
    cases = [case for group in groups for case in group]
    if share_process:
        chunks = [[c for c in cases if c.impl == impl] for impl in dict.fromkeys(c.impl for c in cases)]
    else:
        chunks = [[case] for case in cases]
    outcome = {}
    for chunk in chunks:
        results, busy = run_quietest(run_chunk, chunk, retries=retries)
        for case, (status, ranks) in zip(chunk, results):
            outcome[case] = (status, ranks, busy)
            where = f"{case.mode} W={case.world} N={case.global_n} {case.impl}"
            print(f"  {where}: {brief(status, ranks)}", file=sys.stderr)
    return outcome


def make_row(case: Case, status: str, ranks: list[dict], busy: float | None) -> dict:
    row = {"mode": case.mode, "device": case.device, "world": case.world, "batch": case.batch}
    row.update(global_n=case.global_n, impl=case.impl, repeats=case.repeats, status=status.splitlines()[0][:200])
    row["others_cpu_share"] = None if busy is None else round(busy, 3)
    if status != "ok":
        return row
    slowest_s = [max(r["times_s"][i] for r in ranks) for i in range(case.repeats)]
    row["ms"] = 1000 * median(slowest_s)
    row["cpu_ms"] = 1000 * median([sum(r["cpu_s"][i] for r in ranks) for i in range(case.repeats)])
    row["first_ms"] = 1000 * max(r["first_s"] for r in ranks)
    row["peak_mib"] = max(r["peak_bytes"] for r in ranks) / MIB
    row["mem_method"] = ranks[0]["mem_method"]
    row["loss"] = sum(r["loss"] for r in ranks) / len(ranks)
    keys = ("loss", "grad_img", "grad_txt", "grad_scale", "peak_bytes", "times_s", "cpu_s")
    row["per_rank"] = [{k: r[k] for k in keys} for r in ranks]
    return row


def rel_err(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-12)


def grouped_reference_loss(case: Case) -> float:
    """open_clip's loss on each block of ``group_size`` ranks' features, averaged over blocks."""
    from open_clip import ClipLoss

    img_ND, txt_ND = make_features(case.global_n, case.dim, case.seed)
    rows = case.batch * case.group_size
    scale = torch.tensor(SCALE)
    with torch.no_grad():
        losses = [ClipLoss()(img_ND[i : i + rows], txt_ND[i : i + rows], scale) for i in range(0, len(img_ND), rows)]
    return torch.stack(losses).mean().item()


def check_agreement(row: dict, ref: dict | None, case: Case) -> None:
    """Set ``agree`` (True/False, None for the reference or without one) and the errors."""
    if row["status"] != "ok" or row["impl"] == REFERENCE[case.mode]:
        row["agree"] = None
        return
    if row["impl"] == "vlp grouped":
        row["loss_rel_err"] = rel_err(row["loss"], grouped_reference_loss(case))
    elif ref is None or ref["status"] != "ok":
        row["agree"] = None
        return
    else:
        row["loss_rel_err"] = rel_err(row["loss"], ref["loss"])
    agree = row["loss_rel_err"] <= LOSS_RTOL
    if row["impl"] in GRAD_COMPARABLE:
        pairs = zip(row["per_rank"], ref["per_rank"])
        row["grad_rel_err"] = max(rel_err(a[k], b[k]) for a, b in pairs for k in ("grad_img", "grad_txt", "grad_scale"))
        agree = agree and row["grad_rel_err"] <= GRAD_RTOL
    row["agree"] = agree


def add_ratios(row: dict, ref: dict | None) -> None:
    """Memory open_clip / vlp and time vlp / open_clip, on vlp rows with a measured reference."""
    ok = row["status"] == "ok" and ref is not None and ref["status"] == "ok"
    if ok and row["impl"].startswith("vlp"):
        row["mem_ratio"] = ref["peak_mib"] / max(row["peak_mib"], 1 / MIB)
        row["time_ratio"] = row["ms"] / ref["ms"]


def group_rows(cases: list[Case], outcome: dict) -> list[dict]:
    """The rows of all impls at one size, compared with the reference impl."""
    rows = [make_row(case, *outcome[case]) for case in cases]
    ref = {row["impl"]: row for row in rows}.get(REFERENCE[cases[0].mode])
    for row, case in zip(rows, cases):
        check_agreement(row, ref, case)
        add_ratios(row, ref)
    return rows


def brief(status: str, ranks: list[dict]) -> str:
    """One progress line; the full text (a traceback) when the case failed."""
    if status != "ok":
        return status
    ms = 1000 * median([max(r["times_s"][i] for r in ranks) for i in range(len(ranks[0]["times_s"]))])
    peak = max(r["peak_bytes"] for r in ranks) / MIB
    loss = sum(r["loss"] for r in ranks) / len(ranks)
    return f"{ms:.1f} ms, peak +{peak:.1f} MiB, loss {loss:.6f} (mean over ranks)"


def repeats_for(args, global_n: int, device: str) -> int:
    if args.repeats is not None:
        return args.repeats
    return 1 if device == "cpu" and global_n >= 16384 else 3


def plan(args) -> list[list[Case]]:
    """Groups of cases (one group per size) for the chosen mode."""
    common = dict(dim=args.dim, tile=args.tile, group_size=args.group_size)
    if args.world > 1:
        batch = args.batch or WORLD_BATCH["quick" if args.quick else "full"]
        repeats = repeats_for(args, batch * args.world, "cpu")
        cases = [Case(i, batch, args.world, "cpu", repeats=repeats, **common) for i in WORLD_IMPLS]
        return [cases]
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    sizes = args.sizes or SIZES["quick" if args.quick else device]
    return [
        [Case(i, n, 1, device, repeats=repeats_for(args, n, device), **common) for i in SINGLE_IMPLS] for n in sizes
    ]


def fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


def display(row: dict) -> dict:
    agree = {True: "✓", False: "✗", None: "ref" if row["impl"] in REFERENCE.values() else "n/a"}[row.get("agree")]
    ok = row["status"] == "ok"
    return {
        **row,
        "mode": f"{row['mode']}-{row['device']}",
        "ms": fmt(row.get("ms"), ".1f") if ok else row["status"].split(":")[0],
        "cpu_ms": fmt(row.get("cpu_ms"), ".0f"),
        "peak": fmt(row.get("peak_mib"), ".1f"),
        "mem_ratio": fmt(row.get("mem_ratio"), ".2f"),
        "time_ratio": fmt(row.get("time_ratio"), ".2f"),
        "agree": agree if ok else "",
        "busy": "" if row["others_cpu_share"] is None else f"{100 * row['others_cpu_share']:.0f}",
    }


COLUMNS = [
    ("mode", "mode"),
    ("world", "world"),
    ("global_n", "global N"),
    ("impl", "impl"),
    ("ms", "ms fwd+bwd"),
    ("cpu_ms", "CPU ms"),
    ("peak", "peak extra MiB"),
    ("mem_ratio", "mem open_clip/vlp"),
    ("time_ratio", "time vlp/open_clip"),
    ("agree", "agree"),
    ("busy", "others' CPU %"),
]


def headline_ratios(rows: list[dict]) -> dict:
    """open_clip / vlp tiled, time and memory, at the largest N where both were measured."""
    for n in sorted({r["global_n"] for r in rows}, reverse=True):
        at_n = {r["impl"]: r for r in rows if r["global_n"] == n and r["status"] == "ok"}
        ref = at_n.get(REFERENCE[rows[0]["mode"]])
        tiled = at_n.get("vlp tiled")
        if ref and tiled:
            return {
                "ratio_vs_open_clip": ref["ms"] / tiled["ms"],
                "memory_ratio_vs_open_clip": ref["peak_mib"] / max(tiled["peak_mib"], 1 / MIB),
                "ratio_basis": {"mode": tiled["mode"], "global_n": n, "reference": ref["impl"], "vlp": "vlp tiled"},
            }
    return {"ratio_vs_open_clip": None, "memory_ratio_vs_open_clip": None, "ratio_basis": None}


def target_lines(rows: list[dict], headline: dict) -> list[str]:
    """The project's targets, with this run's numbers (reported, not enforced)."""
    basis = headline["ratio_basis"]
    if basis is None:
        return ["targets: no vlp tiled / open_clip pair measured"]
    mem, speed = headline["memory_ratio_vs_open_clip"], 1 / headline["ratio_vs_open_clip"]
    tiled = next(r for r in rows if r["impl"] == "vlp tiled" and r["global_n"] == basis["global_n"])
    if basis["mode"] == "single":
        if (tiled["device"], tiled["global_n"]) != ("cpu", 16384):
            return ["targets: defined for one CPU process at N=16384 (the default run); not evaluated"]
        return [
            f"target: tiled peak <= 1/8 of open_clip's: 1/{mem:.1f} -> {'met' if mem >= 8 else 'missed'}",
            f"target: tiled time <= 1.5x open_clip's: {speed:.2f}x -> {'met' if speed <= 1.5 else 'missed'}",
        ]
    if (tiled["world"], tiled["batch"]) != (4, 4096):
        return ["targets: defined for 4 gloo processes x 4096 rows (--world 4); not evaluated"]
    verdict = "met" if mem >= 4 else "missed"
    return [f"target: tiled per-rank peak <= 1/4 of open_clip local's: 1/{mem:.1f} -> {verdict}"]


def versions() -> dict:
    out = {}
    for key, dist_name in (("open_clip", "open_clip_torch"), ("vlp", "vlp")):
        try:
            out[key] = importlib.metadata.version(dist_name)
        except importlib.metadata.PackageNotFoundError:
            out[key] = None
    return out


def report(rows: list[dict], env: dict, args) -> dict:
    headline = headline_ratios(rows)
    git = env["vlp_git"]
    changed = f"changed: {', '.join(git['changed'])}" if git["changed"] else "as committed"
    share = env["other_processes_cpu_share"]
    busy = share is not None and share > BUSY_SHARE / 2
    slowed = " (timings are slowed by that; see the last column)" if busy else ""
    print_environment(env, f"vlp commit {git['commit']}; vlp/losses {changed}", share_note=slowed)
    print(f"D={args.dim} logit_scale={SCALE} tile={args.tile} group_size={args.group_size} fp32")
    print(f"peak memory: {mem_note(rows)}")
    print(format_table([display(r) for r in rows], COLUMNS, right=4))
    for row in rows:
        if ":" in row["status"]:
            print(f"{row['impl']} N={row['global_n']}: {row['status']}")
    for line in target_lines(rows, headline):
        print(line)
    return {"env": env, "args": vars(args), "rows": rows, **headline, "targets": target_lines(rows, headline)}


def mem_note(rows: list[dict]) -> str:
    methods = sorted({r["mem_method"] for r in rows if "mem_method" in r})
    return ", ".join(methods) or "n/a"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes (N 1024 2048; --world: B 512)")
    p.add_argument("--world", type=int, default=1, help="gloo processes on CPU (1: single process)")
    p.add_argument("--sizes", type=int, nargs="+", help="global batch sizes N (single process)")
    p.add_argument("--batch", type=int, help="rows per rank with --world (default 4096; quick 512)")
    p.add_argument("--repeats", type=int, help="timed repeats (default 3; 1 from N=16384 on CPU)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--dim", type=int, default=DIM)
    p.add_argument("--tile", type=int, default=1024, help="vlp tiled tile size")
    p.add_argument("--group-size", type=int, default=2, help="vlp grouped group size (--world)")
    p.add_argument("--retries", type=int, default=0, help="re-run a case while other processes used > 10%% of the CPUs")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    contention = CpuContention()
    contention.start()
    groups = plan(args)
    outcome = execute(groups, share_process=args.quick and args.world == 1, retries=args.retries)
    rows = [row for cases in groups for row in group_rows(cases, outcome)]
    env = run_environment(versions(), REPO, ("vlp/losses",), contention)
    result = report(rows, env, args)
    if args.json:
        write_json(args.json, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
