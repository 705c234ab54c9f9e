"""FSDP2 (``train.backend: fsdp``): torch's ``fully_shard`` shards every transformer block and the
rest of the model over the processes; parameters, gradients and optimizer state are sharded, and
gathered a block at a time for the forward and backward.

- Mixed precision from ``model.precision``: bf16 computes in bf16 and reduces gradients in fp32
  (fp16 needs loss scaling FSDP2 does not do: refused). fp32 is fp32 throughout.
- Exact losses: the process group is the default one; gradients are averaged across ranks, as DDP
  averages them, so W processes with batch B step like one process with batch W x B.
- 0-dim parameters (the logit scale) become 1-element vectors (``fully_shard`` refuses scalars), as
  under ZeRO-3; every reader of the weights accepts both shapes.
- Checkpoints: one folder per step written by ``torch.distributed.checkpoint`` (every rank its
  shards), vlp's training state beside it, the completion marker and ``latest`` last
  (:mod:`vlp.checkpoint.fsdp` reads and consolidates them without a process group).
- Evaluation and validation run on a full, unsharded copy of the model, refreshed from the shards
  each time (twice the model's memory while they run).
- Refused at start-up, in one line: the momentum teacher, extra captions and the trunk feature
  cache (they call the towers outside the sharded forward), fp16, ``train.compile``.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from vlp.checkpoint import architecture_only
from vlp.checkpoint.fsdp import BACKEND, CLIENT_FILE, read_client_state
from vlp.checkpoint.step_folders import StepFolderCheckpointer
from vlp.checkpoint.writing import atomic_write_bytes
from vlp.config import ConfigError
from vlp.train.backend_api import TrainingBackend


def check_supported(cfg, extra_module: bool, teacher: bool) -> None:
    """What FSDP2 cannot train here stops before any data is read, in one line."""
    why = None
    if teacher:
        why = "the momentum teacher (loss.distill, loss.negatives.text_grounded_weight) reads the sharded weights"
    elif extra_module:
        why = "extra captions and the trunk feature cache call the towers outside the sharded forward"
    elif cfg.model.precision == "fp16":
        why = "fp16 needs loss scaling FSDP2 does not do: use model.precision=bf16"
    elif cfg.train.compile:
        why = "train.compile is not wired for it"
    if why:
        raise ConfigError(f"train.backend=fsdp: {why}; use train.backend=ddp or deepspeed for this run")


def _shard(model: torch.nn.Module, precision: str) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    for p in model.parameters():
        if p.dim() == 0:
            p.data = p.data.reshape(1)
    policy = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if precision == "bf16" else None
    )
    kw = {"mp_policy": policy} if policy is not None else {}
    for name, module in model.named_modules():
        if name.endswith("resblocks") and isinstance(module, torch.nn.ModuleList):
            for block in module:
                fully_shard(block, **kw)
    fully_shard(model, **kw)


class FSDPBackend(TrainingBackend):
    name = "fsdp"

    def __init__(self, model, train_module, make_optimizer, make_scheduler, cfg, env, out_dir: Path, autocast):
        from vlp.distributed import barrier

        check_supported(cfg, train_module is not model, teacher=False)
        self.model, self.env, self.cfg, self.autocast = model, env, cfg, autocast
        _shard(model, cfg.model.precision)
        self.module = model
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)
        self.clip, self.logit_scale_max = cfg.train.grad_clip, cfg.train.logit_scale_max
        self.checkpointer = FSDPCheckpointer(
            model, self.optimizer, out_dir / "checkpoints", cfg.train.keep_checkpoints, env.is_main,
            lambda: barrier(env),
        )  # fmt: skip
        self._replica = None

    def describe(self) -> str:
        return f"FSDP2 (fully_shard), {self.env.world} process(es), precision {self.cfg.model.precision}"

    def prepare(self, micro_batches: list[dict]) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    @contextlib.contextmanager
    def no_sync(self, last: bool):
        self.model.set_requires_gradient_sync(last)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

    def step(self, loss: torch.Tensor, guard, step: int, last_checkpoint) -> bool:
        grad_norm = None
        if self.clip > 0 or guard.enabled:
            limit = self.clip if self.clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
            grad_norm = grad_norm.full_tensor() if hasattr(grad_norm, "full_tensor") else grad_norm
        if not guard.step_ok(loss, grad_norm, step, last_checkpoint):
            self.optimizer.zero_grad(set_to_none=True)
            return False
        self.optimizer.step()
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.logit_scale_max))
        return True

    def model_state(self) -> dict:
        return {"scheduler": self.scheduler.state_dict()}  # the weights and optimizer: the checkpointer's shards

    def load_model_state(self, state: dict, path: Path, model_name: str) -> None:
        self.scheduler.load_state_dict(state["scheduler"])

    def _full_state(self) -> dict[str, torch.Tensor]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        return get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=False))

    @contextlib.contextmanager
    def full_model(self):
        from vlp.models.registry import build_model

        state = self._full_state()  # a collective: every rank gathers the full weights
        if self._replica is None:
            self._replica = build_model(architecture_only(self.cfg.model))[0].to(self.env.device)
        own = self._replica.state_dict()
        self._replica.load_state_dict({k: v.reshape(own[k].shape) for k, v in state.items()})
        yield self._replica.eval()

    def trainable_state(self) -> dict[str, torch.Tensor]:
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        names |= {n for n, _ in self.model.named_buffers()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self._full_state().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, state, options=StateDictOptions(full_state_dict=True, strict=False))


class FSDPCheckpointer(StepFolderCheckpointer):
    """Step folders written by ``torch.distributed.checkpoint`` (every rank its shards of the model
    and optimizer) with vlp's training state beside them; the protocol is
    :class:`StepFolderCheckpointer`'s."""

    backend = BACKEND

    def __init__(self, model, optimizer, folder: Path, keep: int, is_main: bool, barrier):
        super().__init__(folder, keep, is_main, barrier)
        self.model, self.optimizer = model, optimizer

    def _states(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def _write(self, path: Path, state: dict) -> None:
        import torch.distributed.checkpoint as dcp

        if self.is_main:
            path.mkdir(parents=True)
        self.barrier()
        dcp.save(self._states(), checkpoint_id=str(path))
        if self.is_main:
            atomic_write_bytes(path / CLIENT_FILE, lambda f: torch.save(state, f))

    def _read(self, tag: Path) -> dict:
        """Load the shards into the model and optimizer; vlp's training state."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        client = read_client_state(tag)
        states = self._states()
        dcp.load(states, checkpoint_id=str(tag))
        set_model_state_dict(self.model, states["model"])
        set_optimizer_state_dict(self.model, self.optimizer, states["optimizer"])
        return client
