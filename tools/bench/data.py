"""Benchmark the training data path: vlp's stream against open_clip's webdataset pipeline.

What it measures: images/s of the whole training loader (shard reading, sample shuffle, JPEG
decode, random resized crop to 224, tensor conversion, tokenization, batching, worker-to-main
transfer) at 0, 1 and 2 DataLoader workers, batch 64, one process each:

* vlp: the loader ``vlp train`` builds (``vlp.train.data.build_train_loader``: JPEGs decoded at
  reduced scale when the crop allows, the crop resized by torch's uint8 bicubic kernel, uint8
  batches, one tokenizer call per batch). Its batches
  are normalised on the training device (``DeviceNormalize``; microseconds on a GPU); what that
  costs when the device is the CPU is timed apart and shown as a second, serial estimate: vlp
  images/s with CPU normalisation = 1 / (1 / rate + normalise seconds per image) (exact with 0
  workers, pessimistic with more, where the main process normalises while workers decode).
* open_clip: ``open_clip_train.data.get_wds_dataset`` itself, with the arguments its training
  script passes and ``open_clip.image_transform(224, is_train=True)`` (crop scale 0.9-1,
  as vlp's default). open_clip 3.3.0's pipeline needs webdataset <= 0.2.86 (with 1.x its tar
  grouping fails: ``KeyError: 'fname'``) and pandas, so it runs in its own virtual environment,
  created once under ``~/.cache/vlp-bench/openclip-peer`` (``--peer-dir``): webdataset 0.2.86 and
  pandas installed there from PyPI, everything else (torch, open_clip) read from this
  environment through a ``.pth`` file. When it cannot be made (no network), the report says why
  (``"open_clip": null``, ``"peer_skipped"``) and only vlp is timed.

Data: N real-sized JPEGs (default 2000; --quick 160), each side uniform in 512-1024 px, photo-like
content (a smooth colour field, a dozen filled shapes, sensor-like noise of std --noise, default 8),
quality --quality (default 90): about 165 KiB and 2.2 bits per pixel, like detailed camera photos.
JPEG decoding time is mostly entropy decoding, proportional to the bits, which reduced-scale decoding
cannot skip: smoother or more compressed images (--noise 3: ~1.1 bits per pixel) favour vlp more.
Captions of 8-20 words. 8 shards, written once under ``~/.cache/vlp-bench/shards`` (--shard-dir)
and reused while the parameters are the same.

Method: a pass builds the loader, creates its iterator and takes K batches of B (default 16 x 64 =
1024 images; --quick 2 x 32); images/s = K x B / the seconds from creating the iterator to the last
batch in hand (worker start-up and the filling of each reader's 1000-sample shuffle buffer
included, as both libraries do them; ``images_per_s_after_first`` in the JSON leaves them out but
overstates under load, when batches queued while the main process waited arrive at once). CPU
ms/image: CPU time of the loading process and its workers over the pass, the measure least moved
by other processes. Each process runs torch with 1 thread (--threads; DataLoader workers always
do): several OpenMP threads per process on busy CPUs slow open_clip's per-image tensor ops far
more than their share. Every (impl, workers) pass runs in a fresh process, R times (default 3;
--quick: 1, one process per side), interleaved (vlp, open_clip, vlp, ...) so load changes on the
machine hit both sides alike; the table shows medians. ratio = vlp images/s / open_clip's at the
same workers (> 1: vlp faster); ``ratio_vs_open_clip`` in the JSON is the smallest of those
ratios. Default sizes take about 5 minutes on 2 half-busy cores.

A pass is finite and each worker may run up to its prefetch depth ahead (vlp 4 batches, open_clip
2): with several workers on few cores, the batches made ahead at the end of a pass (wasted here,
consumed later in training) take CPU from the last needed ones; that counts against vlp, more so
with short passes.

Run from the repository root:
    python tools/bench/data.py                          # 2000 JPEGs, 0/1/2 workers, 3 repeats
    python tools/bench/data.py --quick --json /tmp/data.json
Other options: --images N, --batches K, --batch B, --repeats R, --workers W ..., --quality Q,
--noise S, --threads T, --no-draft (vlp decodes at full size), --pil-resize (vlp resizes with Pillow,
as open_clip: data.train_resize=pil), --no-peer (vlp only). The table goes
to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import multiprocessing
import os
import random
import subprocess
import sys
import sysconfig
import tarfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import PIL.Image

from tools.bench.common import CpuContention, format_table, median, print_environment, run_environment, write_json

REPO = Path(__file__).resolve().parents[2]
RUNNER = Path(__file__).resolve().parent / "data_runner.py"
CACHE = Path(os.environ.get("VLP_BENCH_CACHE", Path.home() / ".cache" / "vlp-bench"))
PEER_REQUIREMENTS = ("webdataset==0.2.86", "pandas")
SHARDS = 8
WORDS = (  # noqa: SIM905 - a readable vocabulary
    "a the photo picture of on in with near under two three small large red blue green white black old new "
    "dog cat car bus street tree house river mountain beach person woman man child table chair window door "
    "flower garden city field sky cloud boat bridge road bicycle sitting standing running parked next to"
).split()


# ---------------------------------------------------------------------------------------------
# benchmark shards


def _photo_jpeg(index: int, seed: int, lo: int, hi: int, quality: int, noise: float) -> bytes:
    """A photo-like JPEG: a smooth random colour field, a dozen filled shapes, sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, index])
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    image = Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)).resize((w, h), Image.BICUBIC)
    draw = ImageDraw.Draw(image)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, w)), int(rng.integers(0, h))
        box = [x0, y0, x0 + int(rng.integers(20, w // 2)), y0 + int(rng.integers(20, h // 2))]
        fill = tuple(int(v) for v in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)(box, fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, noise, (h, w, 3)).astype(np.int16)
    buf = io.BytesIO()
    Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def _caption(index: int, seed: int) -> bytes:
    rng = random.Random(f"{seed}/{index}")
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(8, 20))).encode()


def _write_shard(job) -> int:
    path, indices, seed, lo, hi, quality, noise = job
    tmp = Path(str(path) + ".tmp")
    with tarfile.open(tmp, "w") as tar:
        for i in indices:
            for ext, data in (("jpg", _photo_jpeg(i, seed, lo, hi, quality, noise)), ("txt", _caption(i, seed))):
                info = tarfile.TarInfo(f"{i:08d}.{ext}")
                info.size, info.mtime = len(data), 0
                tar.addfile(info, io.BytesIO(data))
    tmp.replace(path)  # a shard is complete or absent
    return len(indices)


def benchmark_shards(root: Path, images: int, quality: int = 90, noise: float = 8, lo=512, hi=1024, seed=0):
    """Write (once) ``images`` JPEG samples in 8 shards under ``root``; returns their brace pattern
    and ``{"bits_per_pixel", "kib_per_image", ...}``."""
    folder = root / f"jpeg-n{images}-px{lo}-{hi}-q{quality}-noise{noise:g}-seed{seed}"
    paths = [folder / f"bench-{s:06d}.tar" for s in range(SHARDS)]
    missing = [p for p in paths if not p.exists()]
    if missing:
        folder.mkdir(parents=True, exist_ok=True)
        per = math.ceil(images / SHARDS)
        jobs = [
            (p, range(s * per, min(images, (s + 1) * per)), seed, lo, hi, quality, noise) for s, p in enumerate(paths)
        ]
        jobs = [j for j in jobs if j[0] in missing]
        print(f"writing {images} JPEGs ({lo}-{hi} px) to {folder} (once)", file=sys.stderr)
        with multiprocessing.get_context("fork").Pool(min(len(jobs), os.cpu_count() or 1)) as pool:
            pool.map(_write_shard, jobs)
    jpeg_bytes = pixels = 0
    for path in paths:  # read whole: the page cache is warm, decoding is timed, not the disk
        with tarfile.open(fileobj=io.BytesIO(path.read_bytes())) as tar:
            for member in tar:
                if member.name.endswith(".jpg"):
                    with PIL.Image.open(tar.extractfile(member)) as im:
                        jpeg_bytes, pixels = jpeg_bytes + member.size, pixels + im.size[0] * im.size[1]
    stats = {
        "images": images,
        "px": [lo, hi],
        "quality": quality,
        "noise": noise,
        "kib_per_image": jpeg_bytes / images / 1024,
        "megapixels_per_image": pixels / images / 1e6,
        "bits_per_pixel": 8 * jpeg_bytes / pixels,
    }
    return str(folder / f"bench-{{000000..{SHARDS - 1:06d}}}.tar"), stats


# ---------------------------------------------------------------------------------------------
# open_clip's environment


def _site_packages() -> list[str]:
    paths = [sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]]
    return list(dict.fromkeys(p for p in paths if Path(p).is_dir()))


def _peer_check(python: Path) -> tuple[bool, str]:
    code = "import webdataset, pandas, open_clip_train.data as d; print(webdataset.__version__)"
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        return False, (done.stderr.strip().splitlines() or ["?"])[-1]
    version = done.stdout.strip()
    return version == "0.2.86", f"webdataset {version}"


def peer_python(folder: Path) -> tuple[Path | None, str]:
    """The peer environment's interpreter, creating the environment when needed; or (None, why)."""
    python = folder / "bin" / "python"
    if python.exists():
        ok, why = _peer_check(python)
        if ok:
            return python, ""
        print(f"peer environment {folder} unusable ({why}): rebuilding", file=sys.stderr)
    print(f"creating open_clip's environment {folder} (once): {' '.join(PEER_REQUIREMENTS)}", file=sys.stderr)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--clear", "--without-pip", str(folder)], check=True, timeout=300)
        purelib = subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            capture_output=True, text=True, check=True, timeout=300,
        ).stdout.strip()  # fmt: skip
        # this environment's packages (torch, open_clip) come after the peer's own (webdataset 0.2.86)
        Path(purelib, "_vlp_bench_main_env.pth").write_text("\n".join(_site_packages()) + "\n")
        pip = [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(python),
            "install",
            "--quiet",
            "--disable-pip-version-check",
        ]
        done = subprocess.run([*pip, *PEER_REQUIREMENTS], capture_output=True, text=True, timeout=900)
    except (OSError, subprocess.SubprocessError) as e:
        return None, f"could not create {folder}: {e}"
    if done.returncode != 0:
        return (
            None,
            f"pip install {' '.join(PEER_REQUIREMENTS)} failed: {(done.stderr.strip().splitlines() or ['?'])[-1]}",
        )
    ok, why = _peer_check(python)
    return (python, "") if ok else (None, f"peer environment check failed: {why}")


# ---------------------------------------------------------------------------------------------
# running


def run_side(python: str, impl: str, shards: str, workers: list[int], args, repeats: int = 1) -> list[dict]:
    cmd = [python, str(RUNNER), "--impl", impl, "--shards", shards, "--workers", *map(str, workers)]
    cmd += ["--batches", str(args.batches), "--batch", str(args.batch), "--size", str(args.size)]
    cmd += ["--repeats", str(repeats), "--threads", str(args.threads)]
    cmd += ["--no-draft"] if args.no_draft and impl == "vlp" else []
    cmd += ["--pil-resize"] if args.pil_resize and impl == "vlp" else []
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    if impl == "vlp":
        env["PYTHONPATH"] = str(REPO)
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{impl} runner failed:\n{done.stderr[-3000:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    for row in result["rows"]:
        row["versions"] = result["versions"]
    return result["rows"]


def measure(args, shards: str, peer: Path | None) -> list[dict]:
    """Every pass's row: interleaved per repeat (vlp then open_clip at each worker count)."""
    sides = [("vlp", sys.executable)] + ([("open_clip", str(peer))] if peer else [])
    passes: list[dict] = []
    if args.quick:  # one process per side: start-up would dominate the seconds a quick run has
        for impl, python in sides:
            passes += run_side(python, impl, shards, args.workers, args)
        return passes
    for r in range(args.repeats):
        for w in args.workers:
            for impl, python in sides:
                row = run_side(python, impl, shards, [w], args)[0]
                print(f"  repeat {r + 1}: {impl} workers={w}: {row['images_per_s']:.1f} images/s", file=sys.stderr)
                passes.append(row)
    return passes


METRICS = ("images_per_s", "images_per_s_after_first", "cpu_ms_per_image", "cpu_normalize_ms_per_image")


def summarise(passes: list[dict], workers: list[int]) -> tuple[list[dict], list[dict]]:
    """Medians per (impl, workers); ratios vlp / open_clip per workers (CPU: open_clip / vlp,
    so > 1 means vlp better on every ratio)."""
    rows, ratios = [], []
    for w in workers:
        med = {}
        for impl in ("vlp", "open_clip"):
            mine = [p for p in passes if p["impl"] == impl and p["workers"] == w]
            if mine:
                med[impl] = {m: median([p[m] for p in mine]) if mine[0][m] is not None else None for m in METRICS}
                rows.append({"impl": impl, "workers": w, **med[impl], "runs": [p["images_per_s"] for p in mine]})
        if len(med) == 2:
            v, o = med["vlp"], med["open_clip"]
            ratios.append({
                "workers": w,
                "ratio": v["images_per_s"] / o["images_per_s"],
                "ratio_after_first": v["images_per_s_after_first"] / o["images_per_s_after_first"],
                "ratio_cpu_normalise": 1 / (1 / v["images_per_s"] + v["cpu_normalize_ms_per_image"] / 1000)
                / o["images_per_s"],
                "cpu_ratio": o["cpu_ms_per_image"] / v["cpu_ms_per_image"],
            })  # fmt: skip
    return rows, ratios


def report(result: dict) -> None:
    env = result["env"]
    print_environment(env, hide=("peer",))
    a = result["args"]
    d = result["data"]
    print(f"{a['images']} JPEGs of {d['px'][0]}-{d['px'][1]} px (quality {d['quality']}, {d['kib_per_image']:.0f} KiB, "
          f"{d['bits_per_pixel']:.2f} bits/pixel), batch {a['batch']}, {a['batches']} batches/pass, output "
          f"{a['size']} px, median of {a['repeats']} pass(es), {a['threads']} torch thread(s) per process")  # fmt: skip
    rows = {(r["impl"], r["workers"]): r for r in result["rows"]}
    ratios = {r["workers"]: r for r in result["ratios"]}

    def cell(impl, w, key, f=".1f"):
        return format(rows[(impl, w)][key], f) if (impl, w) in rows else "-"

    table = [
        {
            "workers": w,
            "vlp": cell("vlp", w, "images_per_s"),
            "oc": cell("open_clip", w, "images_per_s"),
            "ratio": f"{ratios[w]['ratio']:.2f}" if w in ratios else "-",
            "vlp_cpu": cell("vlp", w, "cpu_ms_per_image"),
            "oc_cpu": cell("open_clip", w, "cpu_ms_per_image"),
            "cpu_ratio": f"{ratios[w]['cpu_ratio']:.2f}" if w in ratios else "-",
        }
        for w in a["workers"]
    ]
    print(format_table(table, TABLE, right=1))
    print("images/s: from creating the loader's iterator to the last batch; CPU ms/image: the loading "
          "process and its workers")  # fmt: skip
    norm = [p["cpu_normalize_ms_per_image"] for p in result["passes"] if p["impl"] == "vlp"]
    if norm and result["ratios"]:
        shown = ", ".join(f"{r['ratio_cpu_normalise']:.2f}" for r in result["ratios"])
        print(f"vlp normalises on the training device; on the CPU that costs {median(norm):.2f} ms/image: "
              f"ratios then (serial estimate) {shown}")  # fmt: skip
    if a["quick"]:
        print("--quick: a smoke test; with 2 batches per pass the rates mean little (run the default sizes)")
    if result["open_clip"] is None:
        print(f"open_clip not measured: {result['peer_skipped']}")
    elif result["ratio_vs_open_clip"] is not None:
        target = "met" if result["ratio_vs_open_clip"] >= 2 else "NOT met"
        print(f"smallest ratio {result['ratio_vs_open_clip']:.2f} (target >= 2x at equal workers: {target})")


TABLE = [
    ("workers", "workers"),
    ("vlp", "vlp images/s"),
    ("oc", "open_clip images/s"),
    ("ratio", "ratio"),
    ("vlp_cpu", "vlp CPU ms/image"),
    ("oc_cpu", "open_clip CPU ms/image"),
    ("cpu_ratio", "CPU open_clip/vlp"),
]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="160 JPEGs, 2 batches of 32 per pass, 1 repeat")
    p.add_argument("--images", type=int, help="JPEGs in the shard set (default 2000; quick 160)")
    p.add_argument("--batches", type=int, help="batches timed per pass (default 16; quick 2)")
    p.add_argument("--batch", type=int, help="batch size (default 64; quick 32)")
    p.add_argument("--size", type=int, default=224, help="output image size")
    p.add_argument("--quality", type=int, default=90, help="JPEG quality of the benchmark images")
    p.add_argument("--noise", type=float, default=8, help="pixel noise std of the benchmark images (0-255 scale)")
    p.add_argument("--repeats", type=int, help="passes per (impl, workers) (default 3; quick 1)")
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2], help="DataLoader worker counts")
    p.add_argument("--no-draft", action="store_true", help="vlp decodes JPEGs at full size (data.jpeg_draft=false)")
    p.add_argument("--pil-resize", action="store_true", help="vlp resizes crops with Pillow (data.train_resize=pil)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of each loader process (0: torch's default)")
    p.add_argument("--no-peer", action="store_true", help="time vlp only")
    p.add_argument("--shard-dir", type=Path, default=CACHE / "shards", help="where the benchmark shards are kept")
    p.add_argument("--peer-dir", type=Path, default=CACHE / "openclip-peer", help="open_clip's environment")
    p.add_argument("--json", type=Path, help="also write the report as JSON here")
    args = p.parse_args(argv)
    q = args.quick
    args.images = args.images or (160 if q else 2000)
    args.batches = args.batches or (2 if q else 16)
    args.batch = args.batch or (32 if q else 64)
    args.repeats = args.repeats or (1 if q else 3)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    shards, data_stats = benchmark_shards(args.shard_dir, args.images, args.quality, args.noise)
    peer, why = (None, "--no-peer") if args.no_peer else peer_python(args.peer_dir)
    if peer is None:
        print(f"open_clip's pipeline will not be timed: {why}", file=sys.stderr)
    contention = CpuContention()
    contention.start()
    passes = measure(args, shards, peer)
    rows, ratios = summarise(passes, args.workers)
    env = run_environment(None, REPO, ("vlp/data", "vlp/train/data.py"), contention)
    env["vlp_side"] = next((p["versions"] for p in passes if p["impl"] == "vlp"), {})
    env["open_clip_side"] = next((p["versions"] for p in passes if p["impl"] == "open_clip"), None)
    result = {
        "env": env,
        "args": {
            **vars(args),
            "shard_dir": str(args.shard_dir),
            "peer_dir": str(args.peer_dir),
            "json": str(args.json),
        },
        "shards": shards,
        "data": data_stats,
        "rows": rows,
        "ratios": ratios,
        "passes": passes,
        "open_clip": {"python": str(peer)} if peer else None,
        "peer_skipped": why or None,
        "ratio_vs_open_clip": min((r["ratio"] for r in ratios), default=None),
        "ratio_vs_open_clip_cpu_normalise": min((r["ratio_cpu_normalise"] for r in ratios), default=None),
        "seconds": round(time.perf_counter() - started, 1),
    }
    report(result)
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
