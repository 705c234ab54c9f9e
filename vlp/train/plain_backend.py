"""One process, or several under DDP (``train.backend: single | ddp | auto``): torch's own optimizer
step with vlp's clipping, non-finite guard, fp16 loss scaling and logit-scale clamp; checkpoints as
one ``.pt`` file per step (:class:`vlp.checkpoint.writing.Checkpointer`)."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from vlp.checkpoint import load_state_dict_checked
from vlp.checkpoint.writing import Checkpointer
from vlp.train.backend_api import TrainingBackend
from vlp.train.ema import ModuleWeights


class PlainBackend(TrainingBackend):
    """``model``: the single-device model; ``train_module``: what the training forward runs (the
    model, or a wrapper sharing its parameters: cached heads, extra captions)."""

    name = "ddp"

    def __init__(self, model, train_module, make_optimizer, make_scheduler, cfg, env, out_dir: Path):
        t = cfg.train
        self.model, self.env = model, env
        self.optimizer = make_optimizer(model)
        self.scheduler = make_scheduler(self.optimizer)
        self.clip, self.logit_scale_max = t.grad_clip, t.logit_scale_max
        self.module = wrap_model(train_module, env)
        if t.compile:  # the training forward only: evaluation, validation and the teacher run the plain modules
            self.module = torch.compile(self.module)
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=cfg.model.precision == "fp16")
        self.checkpointer = Checkpointer(out_dir / "checkpoints", t.keep_checkpoints, env.is_main)
        self.step_applied = True  # whether the last step changed the weights (see step)

    def prepare(self, micro_batches: list[dict]) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        return self.scaler.scale(loss)

    def no_sync(self, last: bool):
        module = getattr(self.module, "_orig_mod", self.module)  # a compiled DDP module syncs as its original
        if last or not hasattr(module, "no_sync"):
            return super().no_sync(last)
        return module.no_sync()

    def step(self, loss: torch.Tensor, guard, step: int, last_checkpoint) -> bool:
        grad_norm = None
        if self.clip > 0 or guard.enabled:
            self.scaler.unscale_(self.optimizer)
            limit = self.clip if self.clip > 0 else math.inf
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), limit)
        # with fp16 loss scaling the scaler itself skips steps with inf/nan gradients; the guard checks the loss
        checked_norm = None if self.scaler.is_enabled() else grad_norm
        if not guard.step_ok(loss, checked_norm, step, last_checkpoint):
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.update()
            return False
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # the GradScaler skipped the update (inf/nan gradients) exactly when it lowered the scale; a
        # host read after the one its own inf check made. The step still counts, as open_clip counts it.
        self.step_applied = scale is None or self.scaler.get_scale() >= scale
        self.scheduler.step()
        with torch.no_grad():
            self.model.logit_scale.clamp_(0, math.log(self.logit_scale_max))
        return True

    def ema_weights(self):
        """The module's trainable weights; the EMA is not updated after a step the GradScaler skipped."""
        return ModuleWeights(self.model, self.env.is_main, applied=lambda: self.step_applied)

    def model_state(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
        }

    def load_model_state(self, state: dict, path: Path, model_name: str) -> None:
        load_state_dict_checked(self.model, state["model"], path, model_name)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])


def wrap_model(model: torch.nn.Module, env) -> torch.nn.Module:
    """DDP when there are several processes; the model itself otherwise."""
    if env.world == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    ids = [env.device.index] if env.device.type == "cuda" else None
    return DDP(model, device_ids=ids, process_group=env.group)
