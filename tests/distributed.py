"""Run a function on W gloo processes (CPU) and collect each rank's return value."""

from __future__ import annotations

import os
import socket
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, world, port, fn, args, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()  # no rank tears its connections down while another still talks (see vlp.distributed.shutdown)
    finally:
        dist.destroy_process_group()


def run_distributed(fn, world: int, *args) -> list:
    """``fn(rank, world, *args)`` on ``world`` processes; returns the results in rank order.
    ``fn`` must be a module-level function; results must be tensors/containers of tensors."""
    with tempfile.TemporaryDirectory() as out:
        mp.spawn(_worker, args=(world, free_port(), fn, args, out), nprocs=world, join=True)
        return [torch.load(os.path.join(out, f"{r}.pt"), weights_only=True) for r in range(world)]


def torchrun_cmd(module: str, args, nproc: int = 2) -> list[str]:
    """``python -m torch.distributed.run`` running ``python -m MODULE ARGS`` on ``nproc`` local processes."""
    import sys

    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(nproc),
        "--master_port",
        str(free_port()),
        "-m",
        module,
        *[str(a) for a in args],
    ]


def backend_run_sets(shards, out, *extra) -> list[str]:
    """``--set`` arguments of the short runs that compare training backends (DDP, DeepSpeed, FSDP):
    3 steps of batch 16 per rank on the shapes shards, a checkpoint at step 2, no evaluation."""
    base = [
        f"data.train_shards=['{shards['train']}']",
        "data.val_shards=[]",
        "data.batch_size=16",
        "data.workers=0",
        "data.shuffle_buffer=64",
        f"train.output_dir={out}",
        "train.steps=3",
        "train.warmup_steps=1",
        "train.log_every=1",
        "train.checkpoint_every=2",
        "train.device=cpu",
        "eval.tasks=[]",
        "eval.data=[]",
        *extra,
    ]
    return [a for s in base for a in ("--set", s)]
