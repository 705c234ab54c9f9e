"""`vlp shards` through the real CLI, and epoch length from sizes.json."""

from __future__ import annotations

import json

from PIL import Image

from tests.conftest import run_cli, run_main
from vlp.config import load_config
from vlp.train.data import resolve_total_steps


def test_synthetic_shards_cli(tmp_path):
    out = tmp_path / "syn"
    proc = run_cli("shards", "--synthetic", "--num-samples", 50, "--max-samples-per-shard", 20, "--out", out)
    assert "wrote 50 samples in 3 shard(s)" in proc.stdout
    assert json.loads((out / "sizes.json").read_text()) == {
        "shapes-000000.tar": 20,
        "shapes-000001.tar": 20,
        "shapes-000002.tar": 10,
    }
    cfg = load_config(
        None, [f"data.train_shards={out}/shapes-{{000000..000002}}.tar", "train.epochs=2", "data.batch_size=10"]
    )
    assert resolve_total_steps(cfg, world=1) == 10  # 2 epochs x 50 samples / 10


def test_captions_file_cli(tmp_path):
    (tmp_path / "img").mkdir()
    rows = []
    for i in range(5):
        Image.new("RGB", (20, 20), (i * 40, 0, 0)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"red {i}", "source": "test"})
    rows.append({"image": "img/missing.png", "caption": "gone"})
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_main("shards", "--captions", tmp_path / "caps.jsonl", "--out", tmp_path / "out")
    assert "wrote 5 samples" in proc.stdout and "missing_image" in proc.stdout


def test_captions_file_errors_exit_2(tmp_path):
    (tmp_path / "caps.csv").write_text("path,text\nimg/0.png,hello\n")
    proc = run_main("shards", "--captions", tmp_path / "caps.csv", "--out", tmp_path / "o", check=False)
    assert proc.returncode == 2 and "image" in proc.stderr and "caps.csv" in proc.stderr


def test_synthetic_eval_layouts_cli(tmp_path):
    proc = run_main("shards", "--synthetic", "--eval-layouts", "--num-samples", 20, "--out", tmp_path / "ev")
    for task in ("zeroshot_classification", "zeroshot_retrieval", "compositional", "counting"):
        assert f"vlp eval --task {task} --data" in proc.stdout
    assert (tmp_path / "ev" / "counting.jsonl").is_file() and (tmp_path / "ev" / "classification").is_dir()


def test_eval_layouts_say_what_they_write_and_show_one_bar(tmp_path, monkeypatch):
    import vlp.eval.synthetic_layouts as layouts

    bars = []
    real = layouts.tqdm

    def recording(*args, **kwargs):
        bars.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(layouts, "tqdm", recording)
    proc = run_main("shards", "--synthetic", "--eval-layouts", "--num-samples", 6, "--out", tmp_path / "ev")
    first = proc.stdout.splitlines()[0]
    assert first.startswith(
        f"vlp: writing the eval layouts (classification, retrieval, compositional, counting) to {tmp_path / 'ev'}"
    )
    assert "30 scenes, 6 per layout" in first and "--num-samples" in first
    # one bar over every scene, hidden when stderr is not a terminal (disable=None)
    shown = [b for b in bars if b.get("disable") is not True]
    assert len(shown) == 1 and shown[0]["total"] == 30 and shown[0]["disable"] is None
