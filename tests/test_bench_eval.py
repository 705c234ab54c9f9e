"""tools/bench/eval.py --quick runs end to end and its JSON is complete and in agreement (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_eval_benchmark_json(tmp_path):
    out = tmp_path / "eval.json"
    cmd = [sys.executable, "tools/bench/eval.py", "--quick", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    assert {"env", "args", "rows", "ratio_vs_open_clip", "ratio_basis"} <= result.keys()
    (row,) = result["rows"]
    assert row["status"] == "ok", row
    assert (row["model"], row["images"], row["classes"], row["device"]) == ("debug", 64, 4, "cpu")
    for side in ("vlp", "clip_benchmark"):
        assert row[side]["images_per_s"] > 0 and row[side]["prompts_per_s"] > 0
        assert len(row[side]["times_s"]) == row["repeats"] == 1
    # the same model, images and prompts: vlp's logits are CLIP_benchmark's
    assert row["agree"] is True and row["max_logit_diff"] < 1e-3 and row["prompts"] == 4 * 7
    assert result["ratio_vs_open_clip"] == row["ratio"] > 0
    assert result["ratio_basis"]["peer"] == "CLIP_benchmark"
    assert "vlp/CB" in proc.stdout and "✓" in proc.stdout
