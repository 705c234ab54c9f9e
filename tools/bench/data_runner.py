"""One side of tools/bench/data.py: times a training loader over benchmark shards, prints JSON.

Run by data.py, not by hand: ``--impl vlp`` under vlp's interpreter, ``--impl open_clip`` under
the peer environment's (webdataset 0.2.86, where vlp is not installed), so this file imports
nothing from vlp or tools at module level.

Each timed pass builds the loader, creates its iterator and takes ``--batches`` batches: what
each library's loader hands its training step, i.e. open_clip's normalised float batches and vlp's
uint8 batches (vlp normalises on the training device, ``DeviceNormalize``). Rate
(``images_per_s``): from creating the iterator (worker start-up and shuffle-buffer filling
included) to the last batch in hand; ``images_per_s_after_first`` leaves out everything before the
first batch. CPU time: this process
and its workers over the pass. For vlp, ``cpu_normalize_ms_per_image`` is DeviceNormalize of one
batch with the CPU as the device, timed apart (what CPU training would add).
Prints one JSON object: ``{"rows": [one per pass], "versions": {...}}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import sys
import time
from types import SimpleNamespace

import torch

MEAN = (0.48145466, 0.4578275, 0.40821073)  # OpenAI CLIP's, as open_clip's default preprocessing
STD = (0.26862954, 0.26130258, 0.27577711)
SCALE = (0.9, 1.0)  # open_clip's default train crop scale, and vlp's data.train_crop_scale
MODEL = "ViT-B-32"  # the tokenizer both sides use (open_clip's SimpleTokenizer, 77 tokens)


def vlp_loader(pattern: str, workers: int, batch: int, size: int, draft: bool, resize: str = "torch"):
    """The loader ``vlp train`` builds (vlp.train.data.build_train_loader) for this data."""
    from vlp.config import Config
    from vlp.distributed import DistEnv
    from vlp.train.data import build_train_loader

    cfg = Config()
    cfg.model.name = MODEL
    cfg.data.train_shards = [pattern]
    cfg.data.batch_size, cfg.data.workers = batch, workers
    cfg.data.train_crop_scale, cfg.data.jpeg_draft, cfg.data.train_resize = list(SCALE), draft, resize
    model = SimpleNamespace(visual=SimpleNamespace(image_size=size))  # all the builder reads of a model
    loader = build_train_loader(cfg, model, DistEnv())

    def batches():
        for b in loader:
            yield b["image"], b["text"]

    return batches


def cpu_normalize_ms_per_image(batch: int, size: int, repeats: int = 5) -> float:
    """vlp's DeviceNormalize of one uint8 batch with the CPU as the device: the median ms per image."""
    from vlp.data.transforms import DeviceNormalize

    normalize = DeviceNormalize(MEAN, STD)
    images = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        normalize(images, "cpu")
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2] / batch


def open_clip_loader(pattern: str, workers: int, batch: int, size: int, images: int):
    """``open_clip_train.data.get_wds_dataset`` with the arguments its training script passes."""
    import open_clip
    from open_clip_train.data import get_wds_dataset

    args = SimpleNamespace(
        train_data=pattern,
        val_data=None,
        dataset_resampled=False,
        train_num_samples=images,
        train_data_upsampling_factors=None,
        seed=0,
        batch_size=batch,
        world_size=1,
        workers=workers,
    )
    preprocess = open_clip.image_transform(size, is_train=True, mean=MEAN, std=STD, aug_cfg={"scale": SCALE})
    info = get_wds_dataset(args, preprocess, is_train=True, epoch=0, tokenizer=open_clip.get_tokenizer(MODEL))
    info.set_epoch(0)

    def batches():
        yield from info.dataloader

    return batches


def _cpu_seconds(who) -> float:
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime


def timed_pass(impl: str, args, workers: int) -> dict:
    if impl == "vlp":
        resize = "pil" if args.pil_resize else "torch"
        make = vlp_loader(args.shards, workers, args.batch, args.size, not args.no_draft, resize)
    else:
        make = open_clip_loader(args.shards, workers, args.batch, args.size, args.batch * args.batches)
    taken, first = 0, None
    dtype = torch.uint8 if impl == "vlp" else torch.float32  # vlp normalises on the device
    own0, kids0 = _cpu_seconds(resource.RUSAGE_SELF), _cpu_seconds(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    it = make()
    for images, texts in it:
        if images.shape != (args.batch, 3, args.size, args.size) or images.dtype != dtype:
            raise RuntimeError(f"{impl}: unexpected batch {tuple(images.shape)} {images.dtype}")
        if texts.shape[0] != args.batch:
            raise RuntimeError(f"{impl}: {texts.shape[0]} captions for {args.batch} images")
        taken += 1
        first = first or time.perf_counter()
        if taken == args.batches:
            break
    end = time.perf_counter()
    own = _cpu_seconds(resource.RUSAGE_SELF) - own0
    del it, make  # stops and joins the workers, so that their CPU time is counted
    gc.collect()
    cpu = own + _cpu_seconds(resource.RUSAGE_CHILDREN) - kids0
    if taken < max(args.batches, 2):
        raise RuntimeError(f"{impl} with {workers} workers gave {taken} of {args.batches} batches: too few images")
    n = taken * args.batch
    return {
        "impl": impl,
        "workers": workers,
        "images": n,
        "seconds": end - start,
        "images_per_s": n / (end - start),
        # from the first batch to the last; under load it overstates: batches the workers queued
        # while the main process waited for a CPU arrive at once
        "images_per_s_after_first": (n - args.batch) / (end - first),
        "cpu_ms_per_image": 1000 * cpu / n,
        # vlp: what normalising a batch costs when the training device is the CPU (timed apart)
        "cpu_normalize_ms_per_image": cpu_normalize_ms_per_image(args.batch, args.size) if impl == "vlp" else None,
    }


def versions(impl: str) -> dict:
    import importlib.metadata as md

    names = ["torch", "torchvision", "pillow", "webdataset", "open_clip_torch"] + (["pandas"] if impl != "vlp" else [])
    out = {}
    for name in names:
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--impl", choices=("vlp", "open_clip"), required=True)
    p.add_argument("--shards", required=True, help="brace pattern of the benchmark shards")
    p.add_argument("--workers", type=int, nargs="+", default=[0])
    p.add_argument("--batches", type=int, default=16, help="batches timed per pass")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeats", type=int, default=1, help="passes per worker count")
    p.add_argument("--no-draft", action="store_true", help="vlp: decode JPEGs at full size")
    p.add_argument("--pil-resize", action="store_true", help="vlp: resize crops with Pillow (data.train_resize=pil)")
    p.add_argument("--threads", type=int, default=1, help="torch threads of this process (0: torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = [timed_pass(args.impl, args, w) for _ in range(args.repeats) for w in args.workers]
    print(json.dumps({"rows": rows, "versions": versions(args.impl)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
