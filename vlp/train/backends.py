"""Training's process setup and model wrapping, applied from outside the single-device model code.

The process group itself is started by :mod:`vlp.distributed` (shared with evaluation and
captioning); this adds what only training decides: ``train.backend`` (``single`` refuses several
processes, ``deepspeed`` starts the group through DeepSpeed, also for one process; see
deepspeed_backend.py) and DDP wrapping.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from vlp.config import ConfigError
from vlp.distributed import DistEnv, current, init_process, launcher_env, resolve_device

log = logging.getLogger(__name__)


def init_distributed(train_cfg) -> DistEnv:
    """Start the process group when launched with several processes; else a single process."""
    world, local_rank = launcher_env()
    if world > 1 and train_cfg.backend == "single":
        raise ConfigError(
            f"train.backend=single but the launcher started {world} processes; use train.backend=auto or ddp"
        )
    if train_cfg.backend == "deepspeed":
        return _init_deepspeed(train_cfg, world, local_rank, resolve_device(train_cfg.device, local_rank))
    if world == 1 and train_cfg.backend == "ddp":
        log.info("train.backend=ddp with one process: running without DDP")
    return init_process(train_cfg.device, train_cfg.dist_timeout_s)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_deepspeed(train_cfg, world: int, local_rank: int, device: torch.device) -> DistEnv:
    """DeepSpeed always runs a process group, also for one process (then on this host)."""
    from vlp.checkpoint.deepspeed import import_deepspeed

    deepspeed = import_deepspeed(device.type)
    if world == 1:
        for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
            os.environ.setdefault(key, value)
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=train_cfg.dist_timeout_s),
            verbose=False,
        )
    return current(local_rank, device)


def wrap_model(model: torch.nn.Module, env: DistEnv) -> torch.nn.Module:
    """DDP when there are several processes; the model itself otherwise."""
    if env.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, process_group=env.group)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "module", model)
