"""Shared helpers for the benchmarks under tools/bench.

Peak extra memory, measured the same way on every device:

* CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, minus what was
  allocated when the probe started (the inputs).
* CPU (Linux): the process's resident-set high-water mark. ``start()`` frees what the heap holds
  (``gc.collect`` and glibc ``malloc_trim``), resets the mark by writing ``5`` to
  ``/proc/self/clear_refs`` and records the resident set; ``extra()`` is ``VmHWM`` minus that.
  Every byte torch writes counts, whichever allocator or thread wrote it. Where the mark cannot
  be reset the probe falls back to the increase of ``getrusage(RUSAGE_SELF).ru_maxrss``, which is
  exact only while the call's peak is above every earlier peak of the process, so measure in a
  fresh process (``run_isolated``, ``spawn_gloo``).
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import json
import multiprocessing
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

MIB = 2**20


# ---------------------------------------------------------------------------------------------
# memory


def _proc_status_kib(field: str) -> int | None:
    """A ``kB`` field of /proc/self/status (``VmRSS``, ``VmHWM``), or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_rss_peak() -> bool:
    """Set the resident-set high-water mark to the current resident set (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _proc_status_kib("VmHWM") is not None


def malloc_trim() -> None:
    """Hand the heap's free pages back to the OS (glibc), so later use is counted again."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def _ru_maxrss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


class PeakMemory:
    """Peak bytes above the level at ``start()``; see the module docstring for the method."""

    def __init__(self, device: torch.device):
        self.device = torch.device(device)
        self.method = ""
        self._base = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method, self._base = "cuda max_memory_allocated", torch.cuda.memory_allocated(self.device)
            return
        malloc_trim()
        if _reset_rss_peak():
            self.method, self._base = "VmHWM after clear_refs", _proc_status_kib("VmRSS") * 1024
        else:
            self.method, self._base = "ru_maxrss increase", _ru_maxrss_bytes()

    def extra(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self._base
        peak = _proc_status_kib("VmHWM") * 1024 if self.method.startswith("VmHWM") else _ru_maxrss_bytes()
        return max(peak - self._base, 0)


def volunteer_for_oom_killer() -> None:
    """Make this process the kernel's first choice when memory runs out (a benchmark that
    overshoots dies instead of a neighbour); raising one's own score needs no privilege."""
    with contextlib.suppress(OSError):
        Path("/proc/self/oom_score_adj").write_text("1000")


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None off Linux."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# ---------------------------------------------------------------------------------------------
# timing


def synchronize(device: torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device: torch.device):
    """``(seconds, fn())`` with the device synchronised on both sides."""
    synchronize(device)
    start = time.perf_counter()
    out = fn()
    synchronize(device)
    return time.perf_counter() - start, out


def median(values):
    return statistics.median(values) if values else float("nan")


# ---------------------------------------------------------------------------------------------
# processes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _isolated_entry(conn, fn, args) -> None:
    volunteer_for_oom_killer()
    try:
        conn.send(("ok", fn(*args)))
    except BaseException as e:  # report everything to the parent, including KeyboardInterrupt
        conn.send(("error", f"{type(e).__name__}: {e}\n{traceback.format_exc()}"))
    finally:
        conn.close()


def run_isolated(fn, *args):
    """``fn(*args)`` in a fresh spawned Python process: ``("ok", result)``, ``("error", text)``
    or ``("killed", text)`` when it died without answering (e.g. the kernel's OOM killer).
    ``fn`` must be a module-level function and its result picklable."""
    ctx = multiprocessing.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_isolated_entry, args=(child, fn, args))
    proc.start()
    child.close()
    try:
        answer = parent.recv()
    except EOFError:
        answer = None
    proc.join()
    if answer is None:
        return "killed", f"exit code {proc.exitcode}"
    return answer


def _gloo_entry(rank, world, port, fn, args, out_dir) -> None:
    import torch.distributed as dist

    volunteer_for_oom_killer()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        Path(out_dir, f"{rank}.json").write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def spawn_gloo(fn, world: int, *args):
    """``fn(rank, world, *args)`` on ``world`` fresh gloo processes (CPU, one thread each).

    Returns ``("ok", [result of rank 0, 1, ...])`` (results must be JSON-serialisable) or
    ``("error", text)`` / ``("killed", text)`` when a rank raised or died.
    """
    import torch.multiprocessing as mp

    with tempfile.TemporaryDirectory() as out:
        try:
            mp.spawn(_gloo_entry, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
        except mp.ProcessExitedException as e:
            return "killed", str(e)
        except mp.ProcessRaisedException as e:
            return "error", str(e)
        return "ok", [json.loads(Path(out, f"{r}.json").read_text()) for r in range(world)]


# ---------------------------------------------------------------------------------------------
# reporting


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(extra_versions: dict | None = None) -> dict:
    """Hardware and versions, for the report."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    total = None
    with contextlib.suppress(ValueError, OSError, AttributeError):
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        **(extra_versions or {}),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(total / 2**30, 1) if total else None,
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    return env


def run_environment(extra_versions: dict | None, repo: Path, git_paths: tuple[str, ...], contention) -> dict:
    """:func:`environment` plus the git state of ``git_paths`` (``vlp_git``) and the share of the CPUs
    other processes kept busy while ``contention`` ran (``other_processes_cpu_share``)."""
    env = environment(extra_versions)
    env["vlp_git"] = git_state(repo, git_paths)
    share = contention.share()
    env["other_processes_cpu_share"] = None if share is None else round(share, 3)
    return env


def write_json(path: Path, obj) -> None:
    """The benchmark's result as indented JSON (folders created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2, default=str))


def _busy_cpu_seconds() -> float | None:
    """CPU seconds the whole machine has spent busy (all but idle and iowait), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    busy = sum(fields[:8]) - fields[3] - fields[4]  # user..steal, minus idle and iowait
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the measuring processes)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


class CpuContention:
    """Share of the machine's CPUs that *other* processes kept busy between ``start()`` and
    ``share()``: timings taken while it is well above 0 are slowed by them."""

    def start(self) -> None:
        self._wall, self._busy, self._own = time.perf_counter(), _busy_cpu_seconds(), _own_cpu_seconds()

    def share(self) -> float | None:
        busy = _busy_cpu_seconds()
        if busy is None or self._busy is None:
            return None
        foreign = (busy - self._busy) - (_own_cpu_seconds() - self._own)
        capacity = (time.perf_counter() - self._wall) * (os.cpu_count() or 1)
        return min(max(foreign / capacity, 0.0), 1.0)


BUSY_SHARE = 0.1  # --retries: run again while other processes used more of the CPUs than this


def isolated_or_status(fn, *args) -> dict:
    """``fn(*args)`` (a dict with a ``status``) in a fresh process; where that process fails,
    ``{"status": "<how>: <detail>"}``."""
    status, result = run_isolated(fn, *args)
    return result if status == "ok" else {"status": f"{status}: {result}"}


def run_quietest(fn, *args, retries: int):
    """``(fn(*args), busy)``: ``busy`` is the share of the CPUs other processes used meanwhile. While
    it is above BUSY_SHARE, call ``fn`` again, up to ``retries`` more times, and keep the quietest."""
    best = None
    for _ in range(retries + 1):
        contention = CpuContention()
        contention.start()
        result = fn(*args)
        busy = contention.share()
        if best is None or (busy is not None and busy < best[1]):
            best = (result, busy)
        if busy is None or busy <= BUSY_SHARE:
            break
        print(f"  others used {100 * busy:.0f}% of the CPUs meanwhile", file=sys.stderr)
    return best


def print_environment(env: dict, git_line: str | None = None, hide: tuple[str, ...] = (), share_note: str = "") -> None:
    """The report's header: the environment on one line, then ``git_line``, then the share of the
    CPUs other processes kept busy (with ``share_note`` after it)."""
    hidden = {"vlp_git", "other_processes_cpu_share", *hide}
    print(" | ".join(f"{k} {v}" for k, v in env.items() if k not in hidden))
    if git_line is not None:
        print(git_line)
    share = env.get("other_processes_cpu_share")
    if share is not None:
        print(f"other processes kept {100 * share:.0f}% of the CPUs busy during the run{share_note}")


def git_state(repo: Path, paths: tuple[str, ...] = ()) -> dict:
    """The checked-out commit of ``repo`` and the files under ``paths`` that differ from it."""

    def git(*args):
        done = subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=False)
        return done.stdout.strip() if done.returncode == 0 else None

    changed = git("status", "--porcelain", "--", *paths)
    return {"commit": git("rev-parse", "--short", "HEAD"), "changed": changed.splitlines() if changed else []}


def format_table(rows: list[dict], columns: list[tuple[str, str]], right: int = 0) -> str:
    """Aligned plain-text table. ``columns``: (key, header), values printed with ``str``; the
    columns from index ``right`` on are right-aligned (numbers) when ``right`` > 0."""
    cells = [[header for _, header in columns]] + [[str(row.get(key, "")) for key, _ in columns] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]

    def line(r):
        return "  ".join(c.rjust(w) if 0 < right <= i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths), *map(line, cells[1:])])
