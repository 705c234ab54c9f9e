"""DeepSpeed backend (``train.backend: deepspeed``): the same Trainer, through ``deepspeed.initialize``.

- The engine wraps vlp's AdamW (ZeRO partitions its fp32 master weights and states) and vlp's
  schedule (stepped by DeepSpeed at accumulation boundaries, skipped on fp16 overflow).
- Accumulation stays vlp's exact one (:mod:`vlp.train.step`): DeepSpeed is told
  ``gradient_accumulation_steps = k``; every micro-batch's backward goes through ``engine.backward``
  without DeepSpeed's 1/k scaling (each carries its share of the global gradient already), then
  ``engine.step()``, which updates only on the k-th.
- The logit-scale clamp acts on the optimizer's fp32 master copy as well as on the module's copy:
  clamping the module alone is undone by the next step's copy from the master.
- Checkpoints: ``engine.save_checkpoint`` writes one folder per step (every rank its shards); a
  completion marker and the ``latest`` pointer are written atomically by rank 0 after every rank
  has finished, so a killed save is never resumed from. DeepSpeed's own files are read with
  ``torch.load(weights_only=True)`` forced, with only DeepSpeed's plain record classes allowed.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from vlp.checkpoint.deepspeed import BACKEND, import_deepspeed, weights_only_loads
from vlp.checkpoint.step_folders import StepFolderCheckpointer
from vlp.config import Config, ConfigError
from vlp.train.backend_api import TrainingBackend
from vlp.train.ema import MasterWeights


def check_supported(cfg: Config, stage: int) -> None:
    """Combinations DeepSpeed cannot run, or would train wrongly under ZeRO-3, stop here, before
    any data is read."""
    if cfg.train.compile:
        raise ConfigError("train.compile is not supported with train.backend=deepspeed")
    if stage != 3:
        return
    if cfg.train.val_every:
        raise ConfigError("train.val_every (keep the best weights) is not supported with ZeRO-3; use stage 1/2")
    loss = cfg.loss
    if loss.distill.enabled or loss.negatives.text_grounded_weight > 0:
        raise ConfigError(
            "train.deepspeed.zero_stage=3 partitions the parameters, so the momentum teacher's EMA would read "
            "empty shards: use zero_stage 1 or 2 with loss.distill / loss.negatives.text_grounded_weight"
        )
    if cfg.data.negatives.k or cfg.data.counterfactuals:
        raise ConfigError(
            "train.deepspeed.zero_stage=3 with extra captions (data.negatives / data.counterfactuals) is not "
            "supported: the text tower is called outside the model's forward; use zero_stage 1 or 2"
        )


@contextlib.contextmanager
def _scalars_as_vectors(module):
    """0-dim parameters (the logit scale) as 1-element views of the same storage, inside the block.

    DeepSpeed 0.19's start-up broadcast views every parameter as bytes, which fails for 0-dim
    tensors ("self.dim() cannot be 0 to view Float as Byte")."""
    scalars = [p for p in module.parameters() if p.dim() == 0]
    for p in scalars:
        p.data = p.data.reshape(1)
    try:
        yield
    finally:
        for p in scalars:
            p.data = p.data.reshape(())


def initialize(module, optimizer, scheduler, ds_config: dict, env):
    """The engine around ``module``; sets ``env.group`` to its data-parallel group."""
    deepspeed = import_deepspeed(env.device.type)
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    for key, supported in (("fp16", acc.is_fp16_supported()), ("bf16", acc.is_bf16_supported())):
        if ds_config[key]["enabled"] and not supported:
            raise ConfigError(
                f"model.precision={key}: DeepSpeed's '{acc.device_name()}' accelerator does not support it; "
                "use bf16 or fp32 there"
            )
    engine_cls = deepspeed.runtime.engine.DeepSpeedEngine
    broadcast = engine_cls._broadcast_model

    def broadcast_with_scalars(engine):
        with _scalars_as_vectors(engine.module):
            broadcast(engine)

    engine_cls._broadcast_model = broadcast_with_scalars
    if ds_config["zero_optimization"]["stage"] == 3:
        # ZeRO-3 views parameters as bytes in many places (partitioning, GatheredParameters):
        # 0-dim ones stay 1-element vectors for the engine's life; checkpoints are reshaped on export
        for p in module.parameters():
            if p.dim() == 0:
                p.data = p.data.reshape(1)
    try:
        engine, _, _, _ = deepspeed.initialize(
            model=module, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config, dist_init_required=False
        )
    finally:
        engine_cls._broadcast_model = broadcast
    env.group = engine.data_parallel_group
    return engine


def zero_stage(engine) -> int:
    return int(engine.zero_optimization_stage())


def gathered(engine, params, modifier_rank=None):
    """Full parameters inside the block under ZeRO-3 (written back from ``modifier_rank``); a no-op otherwise."""
    if zero_stage(engine) != 3:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)


def clamp_logit_scale(engine, model, max_scale: float) -> None:
    """Clamp ``logit_scale`` to [0, log(max_scale)] in the fp32 master copy and in the module."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_set_full_fp32_param

    p = model.logit_scale
    hi = math.log(max_scale)
    master = safe_get_full_fp32_param(p)  # a collective under ZeRO: every rank calls it
    if master is not None and (master.min() < 0 or master.max() > hi):
        safe_set_full_fp32_param(p, master.clamp(0, hi))
    with gathered(engine, [p], modifier_rank=0), torch.no_grad():
        p.clamp_(0, hi)


# ---- checkpoints ------------------------------------------------------------------------------


class DeepSpeedCheckpointer(StepFolderCheckpointer):
    """Step folders written by ``engine.save_checkpoint`` (every rank its shards, vlp's training
    state as DeepSpeed's client state); the protocol is :class:`StepFolderCheckpointer`'s."""

    backend = BACKEND

    def __init__(self, engine, folder: str | Path, keep: int, is_main: bool, barrier):
        super().__init__(folder, keep, is_main, barrier)
        self.engine = engine

    def _write(self, path: Path, state: dict) -> None:
        self.engine.save_checkpoint(str(self.folder), tag=path.name, client_state=state, save_latest=False)

    def _marker(self, step: int, path: Path) -> dict:
        return {**super()._marker(step, path), "zero_stage": zero_stage(self.engine)}

    def _read(self, tag: Path) -> dict | None:
        """Load the engine's module, optimizer and schedule; DeepSpeed's client state."""
        with weights_only_loads():
            loaded, client = self.engine.load_checkpoint(
                str(tag.parent), tag=tag.name, load_optimizer_states=True, load_lr_scheduler_states=True
            )
        return None if loaded is None else client


def set_master_from_module(model, state: dict) -> None:
    """Write ``state``'s tensors (full, fp32) into the optimizer's master copies (ZeRO 1/2)."""
    from deepspeed.utils import safe_set_full_fp32_param

    params = dict(model.named_parameters())
    for name, value in state.items():
        if name in params:
            safe_set_full_fp32_param(params[name], value.to(params[name].device, torch.float32))


def master_state(model) -> dict[str, torch.Tensor]:
    """The trainable parameters' fp32 master values (a collective per parameter), on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    out = {}
    for name, p in model.named_parameters():
        if p.requires_grad:
            full = safe_get_full_fp32_param(p)
            out[name] = (full if full is not None else p.detach()).float().cpu().clone()
    return out


class DeepSpeedBackend(TrainingBackend):
    """``train.backend: deepspeed``: the engine steps (at its accumulation boundary), scales fp16
    losses, reduces and partitions; vlp's Trainer only feeds it."""

    name = "deepspeed"

    def __init__(self, model, train_module, make_optimizer, make_scheduler, cfg, env, out_dir: Path, autocast):
        from vlp.distributed import barrier
        from vlp.train.deepspeed_config import build_config

        self.model, self.env, self.autocast = model, env, autocast
        self.cfg = cfg
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)
        self.ds_config = build_config(cfg, env.world)
        self.engine = initialize(train_module, self.optimizer, self.scheduler, self.ds_config, env)
        self.module = self.engine
        self.checkpointer = DeepSpeedCheckpointer(
            self.engine, out_dir / "checkpoints", cfg.train.keep_checkpoints, env.is_main, lambda: barrier(env)
        )

    def describe(self) -> str:
        z = self.ds_config["zero_optimization"]["stage"]
        return f"DeepSpeed ZeRO stage {z}, {self.env.world} process(es), precision {self.cfg.model.precision}"

    def prepare(self, micro_batches: list[dict]) -> None:
        from vlp.losses.distributed import check_same_batch

        for b in micro_batches:  # unequal batches would hang ZeRO-3's collectives: fail with the shapes instead
            check_same_batch(b["image"], self.env.group, device=self.env.device)

    def backward(self, loss: torch.Tensor) -> None:
        """``engine.backward`` (loss scaling, ZeRO gradient reduction; no 1/k scaling: ``loss``
        carries its share already) then ``engine.step()``, which updates on the k-th micro-batch only."""
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def step(self, loss: torch.Tensor, guard, step: int, last_checkpoint) -> bool:
        # the engine clipped, stepped and zeroed already (and the schedule): a non-finite loss is
        # detected and counted, not skipped
        guard.step_ok(loss, None, step, last_checkpoint)
        clamp_logit_scale(self.engine, self.model, self.cfg.train.logit_scale_max)
        return True

    @contextlib.contextmanager
    def full_model(self):
        """Under ZeRO-3 the parameters gathered; under bf16/fp16 (module weights in low precision),
        fp32 inputs autocast."""
        with gathered(self.engine, self.model.parameters()), self.autocast():
            yield self.model

    def ema_weights(self):
        """The fp32 master weights (this rank's fragments under ZeRO 1/2), not the module's bf16/fp16 copy."""
        return MasterWeights(self.engine, self.model, self.env.group, self.env.is_main)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return master_state(self.model)  # the fp32 master weights, not the module's bf16/fp16 copy

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        self.model.load_state_dict(state, strict=False)
        set_master_from_module(self.model, state)  # the master weights take them too
