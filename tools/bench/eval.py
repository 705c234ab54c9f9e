"""Benchmark zero-shot evaluation throughput: vlp's feature extraction against CLIP_benchmark's loop.

What it measures, per architecture, on one device, for the same model (CLIP_benchmark's copy
loads vlp's weights), the same N JPEG files in an ImageFolder layout (C classes) and the same
batch size and DataLoader workers:

* images/s of the image side, the median of R repeats after a one-batch warm-up:
  - vlp: ``vlp.eval.extract.image_features`` (what every vlp eval task calls: read and decode in
    the DataLoader, encode, normalise, features kept on the device until the end) with vlp's
    eval preprocessing;
  - CLIP_benchmark: ``clip_benchmark.metrics.zeroshot_classification.run_classification`` (a
    torchvision ``ImageFolder`` + ``DataLoader``, per batch: autocast, ``encode_image``,
    normalise, logits, copied to the host) with the preprocessing of
    ``open_clip.create_model_and_transforms``, as its ``load_open_clip`` builds it.
* prompts/s of the text side (C classes x T templates), the median of R repeats: vlp
  ``vlp.eval.zeroshot.build_classifier`` against CLIP_benchmark's ``zero_shot_classifier``.
* agree: vlp's logits (100 x features @ its classifier) equal CLIP_benchmark's to 1e-3.

Precision: fp32 on both sides (CLIP_benchmark with ``amp=False``; vlp's evaluation has no
autocast). ``ratio_vs_open_clip`` = vlp images/s / CLIP_benchmark images/s (> 1: vlp faster).

Run from the repository root:
    python tools/bench/eval.py                      # CPU: debug (N 2048, B 256) and ViT-B-32 (N 192, B 64)
    python tools/bench/eval.py --device cuda        # GPU: ViT-B-32, N 8192, B 256, 8 workers
    python tools/bench/eval.py --quick --json /tmp/eval.json    # debug, N 64, seconds
Other options: --models, --images N, --batch, --workers, --classes C, --repeats R, --threads T,
--retries K. The default CPU run takes about 6 minutes on 2 cores. The table goes to stdout,
progress to stderr; --json PATH writes the rows, the environment and ``ratio_vs_open_clip`` (of
ViT-B-32 when measured, else of the first model).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import logging
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

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
TEMPLATES = "imagenet-simple"  # open_clip's 7
DEFAULTS = {  # (images, batch, repeats)
    ("cpu", "debug"): (2048, 256, 3),
    ("cpu", "ViT-B-32"): (192, 64, 3),
    ("cuda", "debug"): (8192, 256, 3),
    ("cuda", "ViT-B-32"): (8192, 256, 3),
}


@dataclasses.dataclass(frozen=True)
class Case:
    model: str
    images: int
    batch: int
    repeats: int
    workers: int
    classes: int
    device: str
    threads: int = 0


def write_images(root: Path, n: int, classes: int, seed: int = SEED) -> None:
    """``n`` 256 x 256 JPEGs (smooth random colour fields, photo-like file sizes) in ``classes`` folders."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for i in range(n):
        folder = root / f"class_{i % classes:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        coarse = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
        image = Image.fromarray(coarse).resize((256, 256), Image.BICUBIC)
        image.save(folder / f"{i:06d}.jpg", quality=90)


# ---------------------------------------------------------------------------------------------
# inside the measuring process


def build_models(case: Case, device):
    """vlp's model and preprocessing; CLIP_benchmark's (open_clip's create_model_and_transforms) with vlp's weights."""
    import open_clip

    from vlp.data.transforms import eval_transform
    from vlp.models.registry import build_model, image_size
    from vlp.models.tokenizer import get_tokenizer

    torch.manual_seed(SEED)
    model, mean, std = build_model(case.model, device=device)
    logging.getLogger().setLevel(logging.ERROR)  # open_clip warns "initialized randomly" on the root logger
    peer, _, peer_preprocess = open_clip.create_model_and_transforms(case.model, pretrained=None, device=device)
    peer.load_state_dict(model.state_dict())
    tokenizer = get_tokenizer(case.model)
    return (model.eval(), eval_transform(image_size(model), mean, std)), (peer.eval(), peer_preprocess), tokenizer


def measure(case: Case, root: str) -> dict:
    """Warm-up on one batch, then R repeats of each side's image pass (alternating order), then the text side."""
    from clip_benchmark.metrics import zeroshot_classification as cb
    from torch.utils.data import DataLoader, Subset
    from torchvision.datasets import ImageFolder

    from vlp.distributed import DistEnv
    from vlp.eval.datasets import load_templates
    from vlp.eval.extract import image_features
    from vlp.eval.zeroshot import build_classifier

    if case.threads:
        torch.set_num_threads(case.threads)
    device = torch.device(case.device)
    env = DistEnv(device=device)
    (model, preprocess), (peer, peer_preprocess), tokenizer = build_models(case, device)
    folder = ImageFolder(root, transform=peer_preprocess)
    paths = [path for path, _ in folder.samples]
    classnames = [name.replace("_", " ") for name in folder.classes]
    templates = [t("{c}") for t in load_templates(TEMPLATES)]  # as str.format templates, which both sides take

    def vlp_text():
        kw = dict(device=device, batch_size=case.batch)
        return build_classifier(model.encode_text, tokenizer, classnames, templates, **kw)

    def peer_text():
        return cb.zero_shot_classifier(peer, tokenizer, classnames, templates, str(device), amp=False)

    def vlp_images(n):
        return image_features(model, paths[:n], preprocess, env, batch_size=case.batch, workers=case.workers)[0]

    def peer_images(n):
        data = folder if n == len(paths) else Subset(folder, range(n))
        loader = DataLoader(data, batch_size=case.batch, num_workers=case.workers, shuffle=False)
        return cb.run_classification(peer, peer_classifier, loader, str(device), amp=False)[0]

    def timed(fn, *args):
        synchronize(device)
        start = time.perf_counter()
        out = fn(*args)
        synchronize(device)
        return time.perf_counter() - start, out

    with torch.no_grad():
        vlp_classifier, peer_classifier = vlp_text(), peer_text()  # warm-up of the text side
        sides = {"vlp": vlp_images, "clip_benchmark": peer_images}
        for fn in sides.values():
            fn(min(case.batch, len(paths)))
        times, outputs = {name: [] for name in sides}, {}
        for r in range(case.repeats):
            for name in list(sides)[:: 1 if r % 2 == 0 else -1]:
                seconds, outputs[name] = timed(sides[name], len(paths))
                times[name].append(seconds)
        texts = {"vlp": vlp_text, "clip_benchmark": peer_text}
        text_times = {name: [] for name in texts}
        for r in range(case.repeats):
            for name in list(texts)[:: 1 if r % 2 == 0 else -1]:
                text_times[name].append(timed(texts[name])[0])
    logits = 100 * outputs["vlp"].to(vlp_classifier.device) @ vlp_classifier
    diff = (logits.float().cpu() - outputs["clip_benchmark"].float()).abs().max().item()
    return {"times_s": times, "text_times_s": text_times, "prompts": len(classnames) * len(templates),
            "max_logit_diff": diff, "threads": torch.get_num_threads()}  # fmt: skip


def measure_or_error(case: Case, root: str) -> dict:
    try:
        return {"status": "ok", **measure(case, root)}
    except torch.cuda.OutOfMemoryError:
        return {"status": "OOM"}
    except Exception as e:
        traceback.print_exc()
        return {"status": f"error: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------
# in the parent


def make_row(case: Case, result: dict, busy: float | None) -> dict:
    row = {**dataclasses.asdict(case), "status": result["status"].splitlines()[0][:200],
           "others_cpu_share": None if busy is None else round(busy, 3)}  # fmt: skip
    if row["status"] != "ok":
        return row
    for side in ("vlp", "clip_benchmark"):
        row[side] = {
            "images_per_s": case.images / median(result["times_s"][side]),
            "times_s": result["times_s"][side],
            "prompts_per_s": result["prompts"] / median(result["text_times_s"][side]),
        }
    row["ratio"] = row["vlp"]["images_per_s"] / row["clip_benchmark"]["images_per_s"]
    row["text_ratio"] = row["vlp"]["prompts_per_s"] / row["clip_benchmark"]["prompts_per_s"]
    row.update(prompts=result["prompts"], max_logit_diff=result["max_logit_diff"], threads=result["threads"])
    row["agree"] = result["max_logit_diff"] < 1e-3
    return row


COLUMNS = [
    ("model", "model"), ("images", "N"), ("batch", "B"), ("vlp", "vlp images/s"), ("cb", "CLIP_benchmark images/s"),
    ("ratio", "vlp/CB"), ("text", "prompts/s (vlp/CB)"), ("agree", "agree"), ("busy", "others' CPU %"),
]  # fmt: skip


def display(row: dict) -> dict:
    if row["status"] != "ok":
        return {"model": row["model"], "images": row["images"], "vlp": row["status"].split(":")[0]}
    v, c = row["vlp"], row["clip_benchmark"]
    busy = row["others_cpu_share"]
    return {
        **row,
        "vlp": f"{v['images_per_s']:.1f}",
        "cb": f"{c['images_per_s']:.1f}",
        "ratio": f"{row['ratio']:.2f}",
        "text": f"{v['prompts_per_s']:.1f} / {c['prompts_per_s']:.1f}",
        "agree": "✓" if row["agree"] else f"✗ ({row['max_logit_diff']:.1e})",
        "busy": "" if busy is None else f"{100 * busy:.0f}",
    }


def headline(rows: list[dict]) -> dict:
    ok = [r for r in rows if r["status"] == "ok"]
    pick = next((r for r in ok if r["model"] == HEADLINE_MODEL), ok[0] if ok else None)
    if pick is None:
        return {"ratio_vs_open_clip": None, "ratio_basis": None}
    basis = {k: pick[k] for k in ("model", "images", "batch", "device")}
    return {"ratio_vs_open_clip": pick["ratio"], "ratio_basis": {**basis, "peer": "CLIP_benchmark"}}


def report(rows: list[dict], env: dict, args) -> dict:
    git = env["vlp_git"]
    changed = f"{len(git['changed'])} files changed" if git["changed"] else "as committed"
    print_environment(env, f"vlp commit {git['commit']}; {changed}")
    first = rows[0]
    print(f"{first['device']}, fp32, {first['workers']} DataLoader workers, {first['classes']} classes x 7 templates; "
          "median of the repeats")  # fmt: skip
    print(format_table([display(r) for r in rows], COLUMNS, right=1))
    for row in rows:
        if row["status"] != "ok":
            print(f"{row['model']}: {row['status']}")
    return {"env": env, "args": vars(args), "rows": rows, **headline(rows)}


def plan(args) -> list[Case]:
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    models = args.models or (["debug"] if args.quick else ["debug", "ViT-B-32"] if device == "cpu" else ["ViT-B-32"])
    workers = args.workers if args.workers is not None else (8 if device == "cuda" else 0)
    threads = args.threads if args.threads is not None else (1 if args.quick else 0)
    classes = args.classes or (4 if args.quick else 10)
    cases = []
    for model in models:
        images, batch, repeats = (64, 32, 1) if args.quick else DEFAULTS.get((device, model), (256, 64, 3))
        sizes = dict(images=args.images or images, batch=args.batch or batch, repeats=args.repeats or repeats)
        cases.append(Case(model=model, **sizes, workers=workers, classes=classes, device=device, threads=threads))
    return cases


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="debug model, 64 images, 4 classes, 1 repeat, 1 thread")
    p.add_argument("--models", nargs="+", help="architectures (default CPU: debug ViT-B-32; CUDA: ViT-B-32)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--images", type=int, help="images N (default CPU: debug 2048, ViT-B-32 192; CUDA 8192)")
    p.add_argument("--batch", type=int, help="batch size (default CPU: debug 256, ViT-B-32 64; CUDA 256)")
    p.add_argument("--workers", type=int, help="DataLoader workers, both sides (default CPU 0, CUDA 8)")
    p.add_argument("--classes", type=int, help="class folders C (default 10)")
    p.add_argument("--repeats", type=int, help="timed repeats of the image side (default 3)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; quick 1)")
    p.add_argument("--retries", type=int, default=0, help="re-run while others used > 10%% of the CPUs")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("TQDM_DISABLE", "1")  # CLIP_benchmark's progress bars (inherited by the measuring process)
    contention = CpuContention()
    contention.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        written: dict[tuple[int, int], str] = {}
        for case in plan(args):
            key = (case.images, case.classes)
            if key not in written:
                written[key] = str(Path(tmp) / f"{case.images}x{case.classes}")
                write_images(Path(written[key]), case.images, case.classes)
            print(f"  {case.model}: {case.images} images, batch {case.batch} on {case.device} ...", file=sys.stderr)
            result, busy = run_quietest(isolated_or_status, measure_or_error, case, written[key], retries=args.retries)
            rows.append(make_row(case, result, busy))
            print(f"  {case.model}: {rows[-1]['status']}", file=sys.stderr)
    versions = {"open_clip": importlib.metadata.version("open_clip_torch"),
                "clip_benchmark": importlib.metadata.version("clip_benchmark")}  # fmt: skip
    env = run_environment(versions, REPO, ("vlp",), contention)
    result = report(rows, env, args)
    if args.json:
        write_json(args.json, result)
    return 0 if all(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
