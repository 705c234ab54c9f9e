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
import json
import logging
import math
import shutil
from pathlib import Path

import torch

from vlp.checkpoint import architecture_only
from vlp.checkpoint.deepspeed import MARKER, complete_tags
from vlp.checkpoint.fsdp import BACKEND, CLIENT_FILE, fsdp_tag, is_fsdp_tag, read_client_state
from vlp.checkpoint.writing import atomic_write_bytes, older_to_delete
from vlp.config import ConfigError
from vlp.train.backend_api import TrainingBackend

log = logging.getLogger(__name__)


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


class FSDPCheckpointer:
    """Same interface and ``latest`` semantics as :class:`vlp.checkpoint.writing.Checkpointer`; every
    rank calls :meth:`save` and :meth:`load` (collectives)."""

    def __init__(self, model, optimizer, folder: Path, keep: int, is_main: bool, barrier):
        self.model, self.optimizer, self.folder, self.keep = model, optimizer, Path(folder), keep
        self.is_main, self.barrier = is_main, barrier

    def path_for(self, step: int) -> Path:
        return self.folder / f"step_{step:08d}"

    def _states(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

        return {
            "model": get_model_state_dict(self.model),
            "optimizer": get_optimizer_state_dict(self.model, self.optimizer),
        }

    def save(self, step: int, state: dict) -> Path:
        import torch.distributed.checkpoint as dcp

        path = self.path_for(step)
        if self.is_main:
            if path.exists():  # an earlier, interrupted save of this step
                shutil.rmtree(path)
            path.mkdir(parents=True)
        self.barrier()
        dcp.save(self._states(), checkpoint_id=str(path))
        if self.is_main:
            atomic_write_bytes(path / CLIENT_FILE, lambda f: torch.save(state, f))
        self.barrier()  # every rank's shards are on disk
        if self.is_main:
            marker = {"step": step, "files": sorted(p.name for p in path.iterdir()), "backend": BACKEND}
            atomic_write_bytes(path / MARKER, lambda f: f.write(json.dumps(marker).encode()))
            atomic_write_bytes(self.folder / "latest", lambda f: f.write(path.name.encode()))
            tags = [t for t in complete_tags(self.folder) if is_fsdp_tag(t)]
            for old in older_to_delete(tags, step, self.keep):
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()
        return path

    def latest(self) -> Path | None:
        return fsdp_tag(self.folder)

    def load(self, which: str) -> tuple[Path, dict] | None:
        """Load the shards into the model and optimizer; returns ``(folder, vlp's training state)``."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        if which != "latest":
            candidates = [fsdp_tag(which)]
            if candidates[0] is None:
                from vlp.checkpoint import CheckpointError

                raise CheckpointError(f"{which}: not a complete FSDP checkpoint folder (no {MARKER} saying fsdp)")
        else:
            newest = self.latest()
            tags = [t for t in complete_tags(self.folder) if is_fsdp_tag(t)]
            candidates = [t for t in tags if newest is None or t.name <= newest.name]
        for tag in reversed(candidates):
            try:
                client = read_client_state(tag)
                states = self._states()
                dcp.load(states, checkpoint_id=str(tag))
            except Exception as e:  # noqa: BLE001 - a damaged folder: the previous one is tried
                if which != "latest":
                    raise
                log.warning("checkpoint %s is unreadable (%s); trying the previous one", tag, e)
                continue
            set_model_state_dict(self.model, states["model"])
            set_optimizer_state_dict(self.model, self.optimizer, states["optimizer"])
            return tag, client
        return None
