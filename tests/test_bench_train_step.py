"""tools/bench/train_step.py --quick runs end to end and its JSON is complete (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_train_step_benchmark_json(tmp_path):
    out = tmp_path / "train_step.json"
    cmd = [sys.executable, "tools/bench/train_step.py", "--quick", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert {"env", "args", "rows", "ratio_vs_open_clip", "ratio_basis", "targets"} <= result.keys()
    (row,) = result["rows"]
    assert row["status"] == "ok", row
    assert (row["model"], row["batch"], row["device"], row["precision"]) == ("debug", 16, "cpu", "fp32")
    for side in ("vlp", "open_clip"):
        assert row[side]["samples_per_s"] > 0 and row[side]["tflops"] > 0 and row[side]["mfu"] is None
        assert len(row[side]["times_s"]) == row["repeats"] == 1
    assert row["flops_per_sample"] > 0 and row["params"] > 0
    assert result["ratio_vs_open_clip"] == row["ratio"] > 0
    assert result["ratio_basis"] == {"model": "debug", "batch": 16, "device": "cpu"}
    assert "vlp/open_clip" in proc.stdout and "target debug" in proc.stdout
