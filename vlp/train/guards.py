"""What keeps a long run alive: preemption signals and non-finite steps.

- SIGTERM / SIGINT (a scheduler preempting the job, Ctrl-C) set a flag; the trainer finishes the
  current step, writes a checkpoint on every rank's agreement and exits with
  :data:`EXIT_PREEMPTED`, so a launcher with restarts (``torchrun --max-restarts``, the
  ``launch/`` scripts, which always pass ``--resume latest``) continues from it. A second signal
  while the checkpoint is being written is ignored: that write is the point of the first.
  While a single-process run waits for data (:meth:`StopSignals.interruptible`), a signal
  interrupts the wait at once with :class:`StopRequested`: no step is in progress, so the last
  finished step is checkpointed without waiting for a batch that may be slow, or never come. (In
  a multi-process run the other ranks may be inside a step that needs this rank, so the signal is
  acted on after the step, on every rank together.)
- A step whose loss or gradient norm is not finite is skipped (no optimizer update) and counted;
  ``train.max_bad_steps`` consecutive bad steps stop the run with :class:`DivergedError`, which
  names the step and the last good checkpoint. Checking costs one host-device sync per step;
  ``train.max_bad_steps: 0`` turns it off.
"""

from __future__ import annotations

import contextlib
import signal
import threading

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: "try again": the run stopped cleanly and can resume


class DivergedError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class StopRequested(BaseException):  # noqa: N818 - like KeyboardInterrupt, not caught by `except Exception`
    """A stop signal arrived while the trainer was waiting for data (see StopSignals.interruptible)."""


class StopSignals:
    """Records SIGTERM / SIGINT instead of dying mid-step (main thread only; a no-op elsewhere)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.received: int | None = None
        self._previous: dict = {}
        self._waiting = False

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum
        if self._waiting:
            self._waiting = False
            raise StopRequested(signum)

    @contextlib.contextmanager
    def interruptible(self):
        """Within this block a stop signal raises :class:`StopRequested` at once (also when one
        arrived before the block was entered)."""
        if self.received is not None:
            raise StopRequested(self.received)
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    def install(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()

    def agreed(self, env) -> bool:
        """True on every rank if any rank received a signal (a collective when several ranks)."""
        local = self.received is not None
        if env.world == 1 or not dist.is_initialized():
            return local
        flag = torch.tensor([int(local)], device=env.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=env.group)
        return bool(flag.item())


class NonFiniteGuard:
    """Counts steps with a non-finite loss or gradient norm; raises after ``limit`` in a row."""

    def __init__(self, limit: int):
        self.limit = limit
        self.consecutive = 0
        self.total = 0

    @property
    def enabled(self) -> bool:
        return self.limit > 0

    def step_ok(self, loss: torch.Tensor, grad_norm: torch.Tensor | None, step: int, last_checkpoint) -> bool:
        """Whether the step may update the weights (the only host-device sync of the step)."""
        if not self.enabled:
            return True
        finite = torch.isfinite(loss.detach())
        if grad_norm is not None:
            finite = finite & torch.isfinite(grad_norm)
        if bool(finite):
            self.consecutive = 0
            return True
        self.consecutive += 1
        self.total += 1
        if self.consecutive >= self.limit:
            where = f"the last good checkpoint is {last_checkpoint}" if last_checkpoint else "no checkpoint yet"
            raise DivergedError(
                f"step {step + 1}: loss or gradients not finite for {self.consecutive} steps in a row "
                f"(train.max_bad_steps={self.limit}); {where}. Lower train.lr, raise train.warmup_steps, or use "
                "model.precision=bf16 instead of fp16, then resume from that checkpoint"
            )
        return False

    def state_dict(self) -> dict:
        return {"total": self.total}

    def load_state_dict(self, state: dict | None) -> None:
        self.total = int((state or {}).get("total", 0))
