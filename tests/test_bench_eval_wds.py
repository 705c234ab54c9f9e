"""tools/bench/eval_wds.py runs at toy size and finds vlp's metrics equal to CLIP_benchmark's."""

import json

from tools.bench import eval_wds


def test_eval_wds_bench_quick(tmp_path, capsys):
    assert eval_wds.main(["--quick", "--json", str(tmp_path / "b.json")]) == 0
    row = json.loads((tmp_path / "b.json").read_text())["rows"][0]
    assert row["agree"] is True and row["clip_benchmark_s"] > 0 and row["vlp_s"] > 0
    assert "CLIP_benchmark s" in capsys.readouterr().out
