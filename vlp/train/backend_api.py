"""The training-backend seam: how the model is distributed, stepped and saved. The Trainer, the step
and validation talk to a :class:`TrainingBackend` and never ask which one they have.

Implementations: :class:`vlp.train.plain_backend.PlainBackend` (one process, or DDP),
:class:`vlp.train.deepspeed_backend.DeepSpeedBackend` (ZeRO 0-3) and
:class:`vlp.train.fsdp_backend.FSDPBackend` (torch's ``fully_shard``). :func:`vlp.train.backends.build_backend`
picks one from ``train.backend``. A step is::

    backend.prepare(micro_batches)            # before the forwards
    for each micro-batch (vlp.train.step):     # forward on backend.module
        with backend.no_sync(last): backend.backward(backend.scale(loss))
    updated = backend.step(loss, guard, step, last_checkpoint)
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from vlp.train.ema import ModuleWeights


class TrainingBackend:
    """The interface (a base class: its defaults are a single process's)."""

    name = "single"
    module: torch.nn.Module  # what the training forward calls (DDP-wrapped, an engine, a sharded module)
    checkpointer: object  # save(step, state) -> Path, load(which), path_for(step), latest()

    def describe(self) -> str | None:
        """One start-up line saying what runs (None: nothing worth saying)."""
        return None

    def prepare(self, micro_batches: list[dict]) -> None:
        """Before a step's forwards (clear gradients; check what would hang a collective)."""

    def scale(self, loss: torch.Tensor) -> torch.Tensor:
        """The loss as it goes into backward (fp16 loss scaling where the backend does it here)."""
        return loss

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def no_sync(self, last: bool):
        """Around a micro-batch's backward: gradients are reduced across ranks on the ``last`` only."""
        return contextlib.nullcontext()

    def step(self, loss: torch.Tensor, guard, step: int, last_checkpoint) -> bool:
        """Clip, update the weights and the schedule, clamp the logit scale; ``guard``
        (:class:`vlp.train.guards.NonFiniteGuard`) sees the loss and gradient norm. Returns whether
        the weights changed."""
        raise NotImplementedError

    def model_state(self) -> dict:
        """What a checkpoint's dict holds for this backend (model, optimizer, schedule, scaler), or
        {} when the backend's checkpointer writes them itself."""
        return {}

    def load_model_state(self, state: dict, path: Path, model_name: str) -> None:
        """Load what :meth:`model_state` saved (after the checkpointer has read ``state``)."""

    @contextlib.contextmanager
    def full_model(self):
        """The model with full weights, usable outside the training forward (evaluation,
        validation, saving weights)."""
        yield self.model

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """The trainable parameters and buffers at full precision, on the CPU (validation keeps the best)."""
        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        names |= {n for n, _ in self.model.named_buffers()}
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.state_dict().items() if k in names}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put back weights from :meth:`trainable_state` (the best ones, after validation)."""
        self.model.load_state_dict(state, strict=False)

    def ema_weights(self):
        """The trainable fp32 weights as this rank holds them, for the weight EMA (:mod:`vlp.train.ema`):
        the module's parameters (whole, or FSDP2's shards)."""
        return ModuleWeights(self.model, self.env.is_main)

    def close(self) -> None:
        """Release what the backend holds (nothing by default)."""
