"""tools/bench/resume.py runs at toy size: both resumes give the same first batch, and its JSON is complete."""

import importlib.util
import json

from tools.bench import resume


def test_resume_bench_quick(tmp_path, capsys):
    args = ["--quick", "--json", str(tmp_path / "r.json")]
    with_s3 = all(importlib.util.find_spec(m) for m in ("moto", "s3fs"))
    assert resume.main(args + (["--s3"] if with_s3 else [])) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    storages = ("local", "http", "s3") if with_s3 else ("local", "http")
    assert [(r["storage"], r["at"]) for r in result["rows"]] == [(s, a) for s in storages for a in (0.0, 0.1, 0.5, 0.9)]
    resumed = [r for r in result["rows"] if r["at"] > 0]
    assert result["agree"] and all(r["agree"] and r["reread_s"] > 0 and r["seek_s"] > 0 for r in resumed)
    late = {r["storage"]: r for r in resumed if r["at"] == 0.9}
    assert late["http"]["seek_mb"] < late["http"]["reread_mb"]  # bytes, not timings: those vary
    assert set(result["seek_flatness"]) == set(storages)
    assert "reread s" in capsys.readouterr().out
