"""Benchmark the time to the first batch after a mid-epoch resume: reading the epoch again up to the
saved position (what a position without byte offsets does) against seeking to it (range reads of the
shuffle buffer's samples, then reading on from the saved offset).

One reader (``data.workers=0``) over S shards of N JPEG samples; the position is the one a training
run saves after consuming 10%, 50% and 90% of the epoch (made by the stream's own reader, without
decoding). For each storage and each point the loader is built from that position and timed to its
first batch (decoding and augmenting that batch included, as for a fresh start, shown as 0%):

* ``reread``: the position without its offsets, as an older vlp saved it: the reader passes over every
  sample of the epoch so far (tar bytes, no decoding);
* ``seek``: the position as saved now.

Storages: ``local`` files (in the page cache: the cheapest re-read there is), ``http`` from a local
server that answers Range requests (a child process; re-reading goes through curl as training does),
and with ``--s3`` S3 from moto's server (tests/s3_server.py, in a child process; needs moto[server]
and s3fs). The servers run on this machine: no network latency, so the re-read is as cheap as it
gets and each range request costs less than it would on a real network.
``ratio`` = reread s / seek s; ``MB`` = bytes the server sent for that first batch. The median of R
repeats; both resumes must give the same first batch (``agree``).

    python tools/bench/resume.py                          # 32 shards x 500 samples (1 GB), buffer 1000
    python tools/bench/resume.py --s3 --json /tmp/resume.json
    python tools/bench/resume.py --quick                  # seconds
"""

from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import random
import sys
import tarfile
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make ``tools.bench`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import numpy as np
import torch
from PIL import Image

from tools.bench.common import CpuContention, format_table, median, write_json

POINTS = (0.1, 0.5, 0.9)


def write_shards(folder: Path, shards: int, per_shard: int, size: int, distinct: int = 64) -> list[Path]:
    """``shards`` tars of ``per_shard`` samples: a photo-like JPEG (smooth colour field plus noise) and
    a caption each. The JPEGs cycle through ``distinct`` encoded images: what is timed is reading tar
    bytes, not the variety of the pixels, and an epoch of a few GB is written in seconds."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    images = []
    for _ in range(distinct):
        coarse = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
        field = np.asarray(Image.fromarray(coarse).resize((size, size), Image.BICUBIC), dtype=np.int16)
        pixels = np.clip(field + rng.integers(-24, 24, field.shape), 0, 255).astype(np.uint8)
        buf = io.BytesIO()
        Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
        images.append(buf.getvalue())
    paths = []
    for s in range(shards):
        path = folder / f"shard-{s:06d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(per_shard):
                key = f"{s:04d}{i:05d}"
                jpg = images[(s * per_shard + i) % distinct]
                for ext, data in (("jpg", jpg), ("txt", f"sample {s} {i}".encode())):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        paths.append(path)
    return paths


def _serve_http(root: Path, sent, conn) -> None:
    from tests.range_server import make_server

    def count(n: int) -> None:
        with sent.get_lock():
            sent.value += n

    server = make_server(root, count)
    conn.send(server.server_port)
    server.serve_forever()


def _serve_s3(sent, conn) -> None:
    """moto's S3 server behind its proxy (tests/s3_server.py), the bytes it sends counted in ``sent``;
    sends ``(env, bucket)`` and runs until anything is received."""
    from tests.s3_server import start

    server, stop = start()
    forward = server.proxy._pipe

    class Counted:
        def __init__(self, sock):
            self.sock = sock

        def recv(self, n):
            data = self.sock.recv(n)
            with sent.get_lock():
                sent.value += len(data)
            return data

        def __getattr__(self, name):
            return getattr(self.sock, name)

    def counting(src, dst):
        forward(Counted(src) if src.getpeername()[1] == server.proxy.target else src, dst)

    server.proxy._pipe = counting
    conn.send((server.env(), server.bucket()))
    conn.recv()
    stop()


@contextlib.contextmanager
def _child(target, *args):
    """``(first message, the connection)`` of ``target(*args, conn)`` run in a child process: a server
    out of this process, as a real one is, so that it does not compete for this process's GIL."""
    ctx = multiprocessing.get_context("fork")
    mine, theirs = ctx.Pipe()
    proc = ctx.Process(target=target, args=(*args, theirs), daemon=True)
    proc.start()
    try:
        yield mine.recv(), mine
    finally:
        with contextlib.suppress(OSError):
            mine.send("stop")
        proc.join(5)
        if proc.is_alive():
            proc.kill()


@contextlib.contextmanager
def http_server(root: Path):
    """``(base url, Value of bytes sent)`` of a threaded http server for ``root`` in a child process."""
    sent = multiprocessing.Value("q", 0)
    with _child(_serve_http, root, sent) as (port, _):
        yield f"http://127.0.0.1:{port}", sent


@contextlib.contextmanager
def s3_bucket(shards: list[Path]):
    """``(base url, Value of bytes sent)``: the shards uploaded to moto's S3 server in a child process."""
    sent = multiprocessing.Value("q", 0)
    with _child(_serve_s3, sent) as ((env, bucket), _):
        os.environ.update(env)
        import s3fs

        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        for path in shards:
            fs.put_file(str(path), f"{bucket}/{path.name}")
        yield f"s3://{bucket}", sent


def _spec(urls: list[str], batch: int, buffer: int):
    from vlp.data.stream import StreamSpec

    return StreamSpec(sources=[urls], batch_size=batch, shuffle_buffer=buffer, seed=0)


def saved_position(spec, consumed: int) -> dict:
    """The loader state a run saves after ``consumed`` samples of epoch 0 (one reader)."""
    from vlp.data.decode import SkipCounter
    from vlp.data.readers import SourceReader

    reader = SourceReader(spec.sources[0], spec, 0, 1, SkipCounter())
    for _ in zip(range(consumed), reader):
        pass
    slot = {"sources": [(reader.epoch, reader.consumed)], "seek": [reader.position()], "draws": 0}
    slot["batches"] = consumed // spec.batch_size
    return {"world": 1, "workers": 1, "next_slot": 0, "slots": {"0": slot}, "skipped": {}, "truncated_captions": 0}


def without_offsets(state: dict) -> dict:
    slots = {k: {n: v for n, v in s.items() if n != "seek"} for k, s in state["slots"].items()}
    return {**state, "slots": slots}


def first_batch(spec, state, sent) -> tuple[float, int, dict]:
    """Seconds and bytes sent to the first batch of a loader built from ``state``; the batch."""
    from vlp.data.stream import StreamLoader
    from vlp.data.transforms import train_transform
    from vlp.models.tokenizer import get_tokenizer

    tokenizer = get_tokenizer("debug")
    sent.value = 0
    t0 = time.perf_counter()
    loader = StreamLoader(spec, train_transform(224), tokenizer, 0, state)
    batch = next(iter(loader))
    seconds = time.perf_counter() - t0
    loader.close()
    return seconds, sent.value, batch


def bench_storage(name: str, urls: list[str], sent, args) -> list[dict]:
    spec = _spec(urls, args.batch, args.buffer)
    epoch = args.shards * args.per_shard
    rows = []
    fresh = [first_batch(spec, None, sent)[0] for _ in range(args.repeats)]
    rows.append({"storage": name, "at": 0.0, "reread_s": median(fresh), "seek_s": median(fresh), "ratio": 1.0})
    for point in POINTS:
        consumed = int(point * epoch) // args.batch * args.batch
        state = saved_position(spec, consumed)
        times: dict[str, list[float]] = {"reread": [], "seek": []}
        sizes, batches = {}, {}
        for _ in range(args.repeats):
            for how, saved in (("reread", without_offsets(state)), ("seek", state)):
                seconds, size, batches[how] = first_batch(spec, saved, sent)
                times[how].append(seconds)
                sizes[how] = size
        same = batches["reread"]["__key__"] == batches["seek"]["__key__"] and torch.equal(
            batches["reread"]["image"], batches["seek"]["image"]
        )
        row = {"storage": name, "at": point, "reread_s": median(times["reread"]), "seek_s": median(times["seek"])}
        row["ratio"] = row["reread_s"] / row["seek_s"]
        if name != "local":
            row["reread_mb"], row["seek_mb"] = sizes["reread"] / 1e6, sizes["seek"] / 1e6
        row["agree"] = same
        rows.append(row)
        print(f"{name} at {point:.0%}: reread {row['reread_s']:.2f} s, seek {row['seek_s']:.2f} s", file=sys.stderr)
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shards", type=int, default=32)
    p.add_argument("--per-shard", type=int, default=500)
    p.add_argument("--image-size", type=int, default=384)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--buffer", type=int, default=1000, help="data.shuffle_buffer")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--s3", action="store_true", help="also S3 from moto's server")
    p.add_argument("--quick", action="store_true", help="4 shards x 40 samples of 64 px, batch 8, buffer 20, 1 repeat")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    if args.quick:
        args.shards, args.per_shard, args.image_size, args.batch, args.buffer, args.repeats = 4, 40, 64, 8, 20, 1
    random.seed(0)
    contention = CpuContention()
    contention.start()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        print(f"writing {args.shards} x {args.per_shard} samples", file=sys.stderr)
        shards = write_shards(root, args.shards, args.per_shard, args.image_size)
        total_mb = sum(s.stat().st_size for s in shards) / 1e6
        rows += bench_storage("local", [str(s) for s in shards], multiprocessing.Value("q", 0), args)
        with http_server(root) as (base, sent):
            rows += bench_storage("http", [f"{base}/{s.name}" for s in shards], sent, args)
        if args.s3:
            with s3_bucket(shards) as (base, sent):
                rows += bench_storage("s3", [f"{base}/{s.name}" for s in shards], sent, args)
    busy = contention.share()
    shown = [
        {
            **r,
            "at": f"{r['at']:.0%}",
            "reread_s": f"{r['reread_s']:.3f}",
            "seek_s": f"{r['seek_s']:.3f}",
            "ratio": f"{r['ratio']:.1f}x",
            "reread_mb": f"{r['reread_mb']:.1f}" if "reread_mb" in r else "",
            "seek_mb": f"{r['seek_mb']:.1f}" if "seek_mb" in r else "",
            "agree": r.get("agree", ""),
        }
        for r in rows
    ]
    columns = [("storage", "storage"), ("at", "epoch"), ("reread_s", "reread s"), ("seek_s", "seek s")]
    columns += [("ratio", "ratio"), ("reread_mb", "reread MB"), ("seek_mb", "seek MB"), ("agree", "agree")]
    epoch = f"{args.shards} shards x {args.per_shard} samples ({total_mb:.0f} MB)"
    print(f"{epoch}, batch {args.batch}, buffer {args.buffer}")
    print(format_table(shown, columns, right=2))
    resumed = [r for r in rows if r["at"] > 0]
    seek = {}
    for r in resumed:
        seek.setdefault(r["storage"], []).append(r["seek_s"])
    flat = {storage: max(times) / min(times) for storage, times in seek.items()}
    print("seek, slowest / fastest point: " + ", ".join(f"{s} {v:.2f}" for s, v in sorted(flat.items())))
    if busy is not None and busy > 0.1:
        print(f"note: other processes used {busy:.0%} of the CPUs during the runs; the times are slowed by them")
    agree = all(r["agree"] for r in resumed)
    if args.json:
        result = {"args": vars(args) | {"json": str(args.json)}, "epoch_mb": total_mb, "rows": rows}
        result |= {"seek_flatness": flat, "agree": agree, "other_cpu_share": busy}
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
