"""tools/bench/accum.py --quick runs end to end and its JSON is complete (no timings checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_quick_accum_benchmark_json(tmp_path):
    out = tmp_path / "accum.json"
    cmd = [sys.executable, "tools/bench/accum.py", "--quick", "--device", "cpu", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert f"wrote {out}" in proc.stdout
    result = json.loads(out.read_text())

    assert {"env", "args", "rows", "ratios"} <= result.keys()
    rows = result["rows"]
    assert {(r["impl"], r["accum_steps"]) for r in rows} == {(i, k) for i in ("vlp", "open_clip") for k in (1, 4, 16)}
    for row in rows:
        assert row["status"] == "ok", row
        assert row["global_batch"] == 16 and row["micro_batch"] * row["accum_steps"] == 16
        for key in ("ms_per_sample", "ms_per_step", "peak_mib", "mem_method", "grad_rel_err_vs_k1"):
            assert key in row, key
        assert row["ms_per_sample"] > 0 and row["peak_mib"] >= 0
        # both compute the large-batch gradient (fp32 rounding apart) ...
        assert row["grad_rel_err_vs_k1"] < 1e-3, row
        # ... except open_clip's logit scale, whose gradient is added in each of its k re-forwards
        want = row["accum_steps"] if row["impl"] == "open_clip" else 1
        assert abs(row["scale_grad_ratio_vs_k1"] - want) < 1e-3 * want, row
    assert [r["accum_steps"] for r in result["ratios"]] == [1, 4, 16]
    for ratio in result["ratios"]:
        assert ratio["mem_ratio"] > 0 and ratio["time_ratio"] > 0
