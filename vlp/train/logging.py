"""Run logging: metrics.jsonl (always), the trackers of ``train.report_to`` (TensorBoard, W&B:
:mod:`vlp.train.tracking`), a tqdm bar on terminals."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from vlp.train.tracking import Tracking


class MetricsLogger:
    """Writes one JSON object per ``log()`` call to ``folder/metrics.jsonl`` and passes it on to the
    trackers of ``tracking`` (main rank only: ``enabled``)."""

    def __init__(
        self,
        folder: Path,
        enabled: bool,
        total_steps: int,
        progress: str = "auto",
        start_step=0,
        tracking: Tracking | None = None,
    ):
        self.enabled = enabled
        self.path = Path(folder) / "metrics.jsonl"
        self.tracking = tracking if enabled else None
        self.bar = None
        if not enabled:
            return
        self._truncate_after(start_step)
        if self.tracking is not None:
            self.tracking.open(folder)
        show = progress == "on" or (progress == "auto" and sys.stderr.isatty())
        if show:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="train", dynamic_ncols=True)

    def _truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint."""
        if not self.path.is_file():
            return
        keep = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                if json.loads(line).get("step", 0) <= step:
                    keep.append(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
        self.path.write_text("".join(k + "\n" for k in keep), encoding="utf-8")

    def log(self, step: int, metrics: dict) -> None:
        if not self.enabled:
            return
        record = {"step": step, **metrics}
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.tracking is not None:
            self.tracking.log(step, metrics)
        if self.bar is not None and "loss" in metrics:
            self.bar.set_postfix(loss=f"{metrics['loss']:.4f}")

    def advance(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def close(self, preempted: bool = False) -> None:
        """Close the bar and finish the trackers (``preempted``: stopped by a signal, to be resumed)."""
        if self.bar is not None:
            self.bar.close()
        if self.tracking is not None:
            self.tracking.close(preempted)


def read_metrics(path: str | Path) -> list[dict]:
    """All records of a metrics.jsonl."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
