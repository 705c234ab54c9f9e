"""tools/bench/loss.py --quick runs end to end and its JSON is complete and in agreement (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMPLS = {"vlp gather", "vlp tiled", "open_clip"}


def test_quick_loss_benchmark_json(tmp_path):
    out = tmp_path / "loss.json"
    cmd = [sys.executable, "tools/bench/loss.py", "--quick", "--device", "cpu", "--json", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(out.read_text())

    rows = result["rows"]
    sizes = {row["global_n"] for row in rows}
    assert sizes == {1024, 2048}
    for n in sizes:
        assert {row["impl"] for row in rows if row["global_n"] == n} == IMPLS
    for row in rows:
        assert row["status"] == "ok", row
        assert row["ms"] > 0 and row["peak_mib"] >= 0
        if row["impl"].startswith("vlp"):
            assert row["agree"] is True, row
            assert row["mem_ratio"] > 0 and row["time_ratio"] > 0
    assert result["ratio_vs_open_clip"] > 0 and result["memory_ratio_vs_open_clip"] > 0
    assert result["ratio_basis"]["global_n"] == 2048
    assert "vlp tiled" in proc.stdout and "✓" in proc.stdout and "✗" not in proc.stdout
