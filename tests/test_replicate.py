"""tools/replicate_counting.py and replicate_negatives.py, --quick: one JSON object each with the
baseline's and the variant's metrics (no target is asserted at 20 steps)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("name, metric", [("counting", "counting_acc"), ("negatives", "compositional_acc")])
def test_quick_replication_prints_one_json_object(demo_data, tmp_path, name, metric):
    (tmp_path / "data").symlink_to(demo_data)  # reused: the session's demo shards are up to date
    cmd = [sys.executable, f"tools/replicate_{name}.py", "--quick", "--json", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["name"] == name and result["steps"] == 20 and result["seeds"] == [0]
    for kind in ("baseline", "variant"):
        assert 0 <= result[kind][metric] <= 1 and 0 <= result[kind]["zeroshot_acc1"] <= 1
    assert result["delta"][metric] == pytest.approx(result["variant"][metric] - result["baseline"][metric])
    assert metric in result["targets"] and (tmp_path / f"replicate_{name}.json").is_file()
