"""Training's process setup and model wrapping, applied from outside the single-device model code.

The process group itself is started by :mod:`vlp.distributed` (shared with evaluation and
captioning); this adds what only training decides: ``train.backend`` (``single`` refuses several
processes, ``deepspeed`` starts the group through DeepSpeed, also for one process; see
deepspeed_backend.py) and which :class:`~vlp.train.backend_api.TrainingBackend` trains.
"""

from __future__ import annotations

import datetime
import logging
import os

import torch
import torch.distributed as dist

from vlp.config import ConfigError
from vlp.distributed import DistEnv, current, init_process, launcher_env, resolve_device
from vlp.train.backend_api import TrainingBackend
from vlp.train.ema import check_supported as ema_supported
from vlp.train.plain_backend import PlainBackend

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
    fsdp = train_cfg.backend == "fsdp"
    if fsdp and world == 1:  # fully_shard needs a process group, also of one
        _single_process_group_env()
    if world == 1 and train_cfg.backend == "ddp":
        log.info("train.backend=ddp with one process: running without DDP")
    return init_process(train_cfg.device, train_cfg.dist_timeout_s, group_of_one=fsdp)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _single_process_group_env() -> None:
    """The launcher's variables for a process group of one, on this host."""
    for key, value in (("RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_RANK", "0"), ("MASTER_ADDR", "127.0.0.1")):
        os.environ.setdefault(key, value)
    os.environ.setdefault("MASTER_PORT", str(_free_port()))


def _init_deepspeed(train_cfg, world: int, local_rank: int, device: torch.device) -> DistEnv:
    """DeepSpeed always runs a process group, also for one process (then on this host)."""
    from vlp.checkpoint.deepspeed import import_deepspeed

    deepspeed = import_deepspeed(device.type)
    if world == 1:
        _single_process_group_env()
    if not dist.is_initialized():
        deepspeed.init_distributed(
            dist_backend="nccl" if device.type == "cuda" else "gloo",
            auto_mpi_discovery=False,
            timeout=datetime.timedelta(seconds=train_cfg.dist_timeout_s),
            verbose=False,
        )
    return current(local_rank, device)


def check_supported(cfg, extra_captions: bool, teacher: bool) -> None:
    """ConfigError (one line) for what ``train.backend`` cannot train; called before any process
    group starts, so a refused run leaves nothing behind."""
    ema_supported(cfg)  # train.ema
    if cfg.model.lora.rank and cfg.train.backend == "deepspeed" and cfg.train.deepspeed.zero_stage == 3:
        raise ConfigError(
            "train.deepspeed.zero_stage=3 with model.lora: LoRA adds its update to the attention weights inside "
            "the forward, which reads ZeRO-3's empty partitions; use zero_stage 1 or 2, or train.backend=fsdp"
        )
    if cfg.train.backend == "deepspeed":
        from vlp.train.deepspeed_backend import check_supported as deepspeed_supported

        deepspeed_supported(cfg, cfg.train.deepspeed.zero_stage)
    elif cfg.train.backend == "fsdp":
        from vlp.train.fsdp_backend import check_supported as fsdp_supported

        fsdp_supported(cfg, extra_module=extra_captions, teacher=teacher)


def build_backend(cfg, env, model, train_module, make_optimizer, make_scheduler, out_dir, autocast) -> TrainingBackend:
    """The :class:`TrainingBackend` of ``train.backend``: DeepSpeed's engine, FSDP2, or plain/DDP
    (single, ddp, auto). ``model`` is the single-device model, ``train_module`` what the training
    forward runs (sharing its parameters); the backend makes the optimizer (``make_optimizer(model)``)
    and schedule (``make_scheduler(optimizer)``) once the model is in its final form (FSDP shards it
    first); ``autocast`` is the precision's context for forwards outside the step."""
    args = (model, train_module, make_optimizer, make_scheduler, cfg, env, out_dir)
    if cfg.train.backend == "deepspeed":
        from vlp.train.deepspeed_backend import DeepSpeedBackend

        return DeepSpeedBackend(*args, autocast)
    if cfg.train.backend == "fsdp":
        from vlp.train.fsdp_backend import FSDPBackend

        return FSDPBackend(*args, autocast)
    return PlainBackend(*args)
