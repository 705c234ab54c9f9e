"""Benchmark `vlp eval` against `clip_benchmark eval` on CLIP_benchmark-format data: wall-clock of a
classification + retrieval pair, the same model, batch size and DataLoader workers, and the metrics.

The data are written by CLIP_benchmark's own converter (``clip_benchmark.webdataset_builder``,
lossless WebP as its command line writes): a classification set of N images (C classes) and a
retrieval set of N/2 images with 5 captions each. The model is one checkpoint file of ``--model``
(random weights) that both load. One repeat is:

* CLIP_benchmark: ``clip_benchmark eval --dataset wds/cls --task zeroshot_classification`` and
  ``--dataset wds/ret --task zeroshot_retrieval`` (its ``--task`` is one per call), ``--no_amp``;
* vlp: ``vlp eval --dataset wds/cls --dataset wds/ret`` (the task follows from dataset_type.txt).

Both run in this process through their command-line entry points, so interpreter start-up and
imports are excluded; model loading, data reading and decoding, encoding and scoring are included.
The median of R repeats after one warm-up each. ``ratio`` = CLIP_benchmark seconds / vlp seconds
(> 1: vlp faster). ``agree``: every metric equal to 1e-6 (NaN equal to NaN).

    python tools/bench/eval_wds.py                     # CPU: debug, N 1024, batch 256, 2 workers
    python tools/bench/eval_wds.py --model ViT-B-32 --images 256 --batch 64
    python tools/bench/eval_wds.py --quick --json /tmp/eval_wds.json   # seconds
"""

from __future__ import annotations

import argparse
import builtins
import io
import json
import math
import sys
import tempfile
import time
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch

from tools.bench.common import CpuContention, format_table, median, write_json


class ConverterInput(torch.utils.data.Dataset):
    """(image bytes, label or captions) items with ``classes`` / ``templates``: what CLIP_benchmark's
    converter takes (images encoded as its command line encodes them, lossless WebP)."""

    def __init__(self, items, classes=None, templates=None):
        self.items, self.classes, self.templates = items, classes, templates

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        from clip_benchmark.webdataset_builder import PIL_to_bytes

        image, target = self.items[i]
        return PIL_to_bytes("webp")(image), target


def write_data(root: Path, n: int, classes: int, seed: int = 0) -> None:
    """CLIP_benchmark's layout, by its own converter: ``root/wds_cls`` and ``root/wds_ret``."""
    from clip_benchmark.webdataset_builder import convert_dataset, convert_retrieval_dataset
    from PIL import Image

    g = np.random.default_rng(seed)

    def image():  # a smooth random photo-sized image: decode and resize cost as for real photos
        small = g.integers(0, 256, (12, 16, 3), dtype=np.uint8)
        return Image.fromarray(small).resize((320, 240), Image.BICUBIC)

    names = [f"class {i}" for i in range(classes)]
    cls = ConverterInput(
        [(image(), i % classes) for i in range(n)], names, ["a photo of a {c}.", "a drawing of a {c}."]
    )
    convert_dataset(cls, "test", str(root / "wds_cls"), max_count=256, verbose=False)
    ret = ConverterInput([(image(), [f"picture {i} number {j}" for j in range(5)]) for i in range(n // 2)])
    convert_retrieval_dataset(ret, "test", str(root / "wds_ret"), max_count=256, verbose=False)


def run_clip_benchmark(root: Path, ckpt: Path, model: str, batch: int, workers: int, out: Path) -> float:
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as zc

    # clip-benchmark 1.6.2 calls float() on a 1-element array, which numpy >= 2.4 rejects
    zc.float = lambda x: builtins.float(np.asarray(x).item())  # a module global of theirs, harmless to keep
    common = ["--dataset_root", str(root / "wds_{dataset}"), "--model", model, "--pretrained", str(ckpt)]
    common += ["--batch_size", str(batch), "--num_workers", str(workers), "--no_amp", "--recall_k", "1", "5", "10"]
    common += ["--output", str(out / "{dataset}_{pretrained}_{model}_{language}_{task}.json")]
    saved = sys.argv
    start = time.perf_counter()
    try:
        for dataset, task in (("wds/cls", "zeroshot_classification"), ("wds/ret", "zeroshot_retrieval")):
            sys.argv = ["clip_benchmark", "eval", "--dataset", dataset, "--task", task, *common]
            with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
                cli.main()
    finally:
        sys.argv = saved
    return time.perf_counter() - start


def run_vlp(root: Path, ckpt: Path, model: str, batch: int, workers: int, out: Path) -> float:
    from vlp.cli import main

    argv = ["eval", "--dataset", "wds/cls", "--dataset", "wds/ret", "--dataset_root", str(root / "wds_{dataset}")]
    argv += ["--model", model, "--checkpoint", str(ckpt), "--batch-size", str(batch), "--workers", str(workers)]
    start = time.perf_counter()
    with redirect_stdout(io.StringIO()), redirect_stderr(io.StringIO()):
        code = main([*argv, "--output", f"{out}/"])
    if code:
        raise RuntimeError(f"vlp eval exited {code}")
    return time.perf_counter() - start


def agree(a: Path, b: Path) -> bool:
    for path in sorted(a.glob("*_en_*.json")):
        ours, theirs = json.loads(path.read_text())["metrics"], json.loads((b / path.name).read_text())["metrics"]
        for key, value in theirs.items():
            x = ours.get(key)
            if not (math.isnan(value) and x is not None and math.isnan(x)) and (x is None or abs(x - value) > 1e-6):
                return False
    return True


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="debug")
    p.add_argument("--images", type=int, default=1024, help="classification images N (retrieval: N/2)")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="N 64, batch 32, 0 workers, 1 repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.batch, args.workers, args.repeats = 64, 32, 0, 1
    import open_clip

    from vlp.checkpoint import architectures

    architectures.register()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        print(f"writing {args.images} + {args.images // 2} images with CLIP_benchmark's converter", file=sys.stderr)
        write_data(tmp, args.images, args.classes)
        ckpt = tmp / f"{args.model}.pt"
        torch.manual_seed(0)
        torch.save(open_clip.create_model(args.model).state_dict(), ckpt)
        runs = {"clip_benchmark": run_clip_benchmark, "vlp": run_vlp}
        times: dict[str, list[float]] = {k: [] for k in runs}
        contention = CpuContention()
        contention.start()
        for repeat in range(args.repeats + 1):  # the first is a warm-up
            for name, fn in runs.items():
                out = tmp / f"{name}_{repeat}"
                out.mkdir()
                seconds = fn(tmp, ckpt, args.model, args.batch, args.workers, out)
                if repeat:
                    times[name].append(seconds)
                print(f"{name} repeat {repeat}: {seconds:.2f} s", file=sys.stderr)
        busy = contention.share()
        same = agree(tmp / "vlp_0", tmp / "clip_benchmark_0")
    n = args.images + args.images // 2
    row = {
        "model": args.model,
        "images": n,
        "batch": args.batch,
        "workers": args.workers,
        "clip_benchmark_s": median(times["clip_benchmark"]),
        "vlp_s": median(times["vlp"]),
    }
    row["ratio"] = row["clip_benchmark_s"] / row["vlp_s"]
    row["agree"], row["other_cpu_share"] = same, busy
    columns = [(k, k) for k in ("model", "images", "batch", "workers")]
    columns += [("clip_benchmark_s", "CLIP_benchmark s"), ("vlp_s", "vlp s"), ("ratio", "ratio"), ("agree", "agree")]
    shown = {**row, "clip_benchmark_s": f"{row['clip_benchmark_s']:.2f}", "vlp_s": f"{row['vlp_s']:.2f}",
             "ratio": f"{row['ratio']:.2f}x"}  # fmt: skip
    print(format_table([shown], columns))
    if busy is not None and busy > 0.1:
        print(f"note: other processes used {busy:.0%} of the CPUs during the runs; the times are slowed by them")
    if args.json:
        write_json(args.json, {"rows": [row], "ratio_vs_clip_benchmark": row["ratio"]})
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
