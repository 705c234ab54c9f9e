"""Process setup shared by training, evaluation and captioning: who this process is (``DistEnv``),
starting the process group from the launcher's environment, and the few collectives they share.

Reads torchrun and the DeepSpeed launcher (RANK/WORLD_SIZE/LOCAL_RANK) and SLURM
(SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID) environments. gloo on CPU, nccl on GPU. Collectives
time out after ``timeout_s`` so a dead rank makes the others fail instead of hanging forever.
Takes what it needs as arguments (a device name, a timeout), never a training config.
"""

from __future__ import annotations

import datetime
import os
import subprocess
from dataclasses import dataclass

import torch
import torch.distributed as dist

from vlp.config import ConfigError


@dataclass
class DistEnv:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    group: object = None  # the data-parallel process group (None = default)

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def launcher_env() -> tuple[int, int]:
    """``(world size, local rank)`` as the launcher set them (SLURM's translated first). Raises
    ConfigError for an MPI launch that left RANK/WORLD_SIZE unset (each process would run alone)."""
    _slurm_env()
    world = int(os.environ.get("WORLD_SIZE", 1))
    mpi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", os.environ.get("PMI_SIZE", 1)))
    if world == 1 and mpi > 1:
        raise ConfigError(
            f"launched by MPI with {mpi} processes, but RANK/WORLD_SIZE are not set: use torchrun, srun, or the "
            "DeepSpeed launcher's default (pdsh) launcher, or export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR"
        )
    return world, int(os.environ.get("LOCAL_RANK", 0))


def _slurm_env() -> None:
    """Translate SLURM's variables into torch.distributed's when not launched by torchrun."""
    if "RANK" in os.environ or "SLURM_PROCID" not in os.environ or int(os.environ.get("SLURM_NTASKS", 1)) < 2:
        return
    os.environ["RANK"] = os.environ["SLURM_PROCID"]
    os.environ["WORLD_SIZE"] = os.environ["SLURM_NTASKS"]
    os.environ["LOCAL_RANK"] = os.environ.get("SLURM_LOCALID", "0")
    if "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
    os.environ.setdefault("MASTER_PORT", "29500")


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """``auto`` (CUDA when visible), ``cpu``, ``cuda`` (this process's local GPU) or a torch device
    name. ConfigError for ``cuda`` without a visible GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError("device cuda was asked for but no CUDA device is visible; use cpu")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def init_process(device: str = "auto", timeout_s: float = 1800, group_of_one: bool = False) -> DistEnv:
    """This process's DistEnv; with several processes (or ``group_of_one``) the default group is
    started (gloo on CPU, nccl on GPU) unless it already runs."""
    world, local_rank = launcher_env()
    env_device = resolve_device(device, local_rank)
    if world == 1 and not group_of_one:
        return DistEnv(device=env_device)
    if not dist.is_initialized():
        backend = "nccl" if env_device.type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    return current(local_rank, env_device)


def current(local_rank: int, device: torch.device) -> DistEnv:
    """The DistEnv of a process whose default group runs."""
    return DistEnv(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=local_rank, device=device)


def all_gather_objects(obj, env: DistEnv) -> list:
    """Every rank's ``obj`` (picklable), in rank order."""
    if env.world == 1 or not dist.is_initialized():
        return [obj]
    out = [None] * env.world
    dist.all_gather_object(out, obj, group=env.group)
    return out


def barrier(env: DistEnv) -> None:
    if env.world > 1 and dist.is_initialized():
        dist.barrier(group=env.group)


def shutdown(env: DistEnv) -> None:
    """Destroy the process group. On the success path, call :func:`barrier` first: with gloo, a rank that
    closes its connections while a peer's transport threads still run its last collective was seen to
    abort the peer at exit ("terminate called without an active exception", SIGABRT) in 2 of ~550 tests.
    Not here, so that a failed rank leaves at once instead of waiting on peers."""
    if dist.is_initialized():
        dist.destroy_process_group()
