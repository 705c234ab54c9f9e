"""Where a run's metrics go besides ``metrics.jsonl`` (``train.report_to``): TensorBoard event files
and Weights & Biases.

Only the main rank opens the trackers (:class:`vlp.train.logging.MetricsLogger`); each receives every
record the run logs (losses, learning rate, throughput, skip counts, validation and eval results)
with its optimizer step. A W&B run starts with the resolved config. Its id is saved in every
checkpoint (``state["tracking"]``), so a run resumed from one (``--resume``) logs on to the same W&B
run; a stop signal finishes it marked as preempted, the end of training as finished.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from vlp.config import Config, ConfigError
from vlp.train.guards import EXIT_PREEMPTED

log = logging.getLogger(__name__)

WANDB_INSTALL = "pip install 'vlp[wandb]'"


def import_wandb():
    """The ``wandb`` module; ConfigError (one line, how to install it) where it is missing."""
    try:
        import wandb
    except ImportError as e:
        raise ConfigError(
            f"train.report_to includes wandb, but wandb is not installed: {WANDB_INSTALL} (import failed: {e})"
        ) from None
    return wandb


class TensorBoardTracker:
    """Numeric metrics as TensorBoard scalars in ``<run folder>/tensorboard``."""

    def __init__(self, writer):
        self.writer = writer

    @classmethod
    def open(cls, folder: Path, cfg: Config, run_id: str) -> TensorBoardTracker | None:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            log.warning("tensorboard is not installed: no TensorBoard files (pip install tensorboard)")
            return None
        return cls(SummaryWriter(str(Path(folder) / "tensorboard")))

    def log(self, step: int, metrics: dict) -> None:
        for k, v in metrics.items():
            if isinstance(v, (int, float)):
                self.writer.add_scalar(k, v, step)

    def close(self, preempted: bool = False) -> None:
        self.writer.close()


def run_name(output_dir: str) -> str:
    """The last part of ``train.output_dir`` (a path or a URL): the W&B run's default name."""
    return output_dir.rstrip("/").rsplit("/", 1)[-1] or output_dir


class WandbTracker:
    """A W&B run: every record is logged at its step (records of one step become one row)."""

    def __init__(self, run):
        self.run = run
        self.run_id = run.id

    @classmethod
    def open(cls, folder: Path, cfg: Config, run_id: str) -> WandbTracker:
        """Start the W&B run (``run_id``: continue that one). Its local files go under ``folder``
        unless ``WANDB_DIR`` says where; ``WANDB_MODE``/``WANDB_PROJECT``/... apply where
        ``train.wandb`` leaves a field empty. Raises ConfigError (one line) if W&B cannot start."""
        wandb = import_wandb()
        w = cfg.train.wandb
        try:
            run = wandb.init(
                project=w.project or os.environ.get("WANDB_PROJECT") or "vlp",
                entity=w.entity or None,
                name=w.name or run_name(cfg.train.output_dir),
                group=w.group or None,
                tags=list(w.tags) or None,
                mode=w.mode or None,
                config=cfg.to_dict(),
                id=run_id or None,
                resume="allow" if run_id else None,
                dir=None if os.environ.get("WANDB_DIR") else str(folder),
            )
        except wandb.errors.Error as e:  # not logged in, server unreachable, ...
            why = " ".join(str(e).split())
            raise ConfigError(
                f"train.report_to=wandb: W&B did not start ({why}); log in with `wandb login`, or run with "
                "WANDB_MODE=offline and upload later with `wandb sync`"
            ) from None
        return cls(run)

    def log(self, step: int, metrics: dict) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self, preempted: bool = False) -> None:
        if preempted:  # the run goes on after a --resume: W&B shows it preempted, not crashed
            self.run.mark_preempting()
        self.run.finish(exit_code=EXIT_PREEMPTED if preempted else 0)


TRACKERS = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker}  # train.report_to's choices


class Tracking:
    """The trackers of ``cfg.train.report_to`` and the W&B run a resumed run continues.

    Built on every rank at start-up, so that W&B requested but not installed stops the run now
    (ConfigError), not once the model and data are ready (a missing TensorBoard is only a warning).
    Only the main rank opens the trackers (:meth:`open`)."""

    def __init__(self, cfg: Config):
        self.cfg = cfg  # the whole config, read when opening: the model section is resolved by then
        self.report_to = list(dict.fromkeys(cfg.train.report_to))
        if "wandb" in self.report_to:
            import_wandb()
        self.wandb_run_id = ""
        self.trackers: list = []

    def state_dict(self) -> dict:
        """What a checkpoint keeps: the W&B run's id (also when this run does not report to W&B,
        so that a later resume with it continues the same W&B run)."""
        return {"wandb_run_id": self.wandb_run_id} if self.wandb_run_id else {}

    def load_state_dict(self, state: dict | None) -> None:
        self.wandb_run_id = (state or {}).get("wandb_run_id", "")

    def open(self, folder: Path) -> None:
        """Start every tracker writing under the run ``folder`` (main rank only)."""
        for name in self.report_to:
            tracker = TRACKERS[name].open(Path(folder), self.cfg, self.wandb_run_id)
            if tracker is not None:
                self.trackers.append(tracker)
            if isinstance(tracker, WandbTracker):
                self.wandb_run_id = tracker.run_id

    def log(self, step: int, metrics: dict) -> None:
        for tracker in self.trackers:
            tracker.log(step, metrics)

    def close(self, preempted: bool = False) -> None:
        """Flush and finish every tracker (``preempted``: the run stopped for a signal and resumes later)."""
        trackers, self.trackers = self.trackers, []
        for tracker in trackers:
            tracker.close(preempted)
