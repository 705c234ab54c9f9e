"""tools/replicate_counting.py, replicate_negatives.py and replicate_pairs.py, --quick: one JSON object each with the
baseline's and the variant's metrics (no target is asserted at 20 steps); the negatives script also
with ``--eval-every``, whose curve gives both arms' metrics and the gain at each evaluated step.

The scripts run as ``__main__`` in the test's process (``runpy``): the same code path as from the
command line, without a fresh interpreter importing torch for each."""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow


@pytest.mark.parametrize(
    "name, metric, every",
    [("counting", "counting_acc", 0), ("negatives", "compositional_acc", 10), ("pairs", "compositional_acc", 0)],
)
def test_quick_replication_prints_one_json_object(demo_data, tmp_path, monkeypatch, capsys, name, metric, every):
    from vlp import demo

    (tmp_path / "data").symlink_to(demo_data)  # reused: the session's demo shards are up to date
    script = REPO / "tools" / f"replicate_{name}.py"
    # --train-images of as many as the session's demo data has reuses that data as it is
    train_images = json.loads((demo_data / "train" / "_info.json").read_text())["num_samples"]
    argv = [str(script), "--quick", "--json", "--out", str(tmp_path), "--eval-every", str(every)]
    argv += ["--train-images", str(train_images)] if name == "counting" else []
    # two sources, minimal groups (one counterfactual of each kind) and pairs, shuffled by the pair-aware buffer
    pairs_args = ["--kinds", "swap_attribute,replace_object", "--kinds", "replace_object", "--every-kind"]
    pairs_args += ["--shuffle-buffer", "64"]
    argv += pairs_args if name == "pairs" else []
    # a variant-only override comes after the script's own variant settings, so it wins (negatives sets w = 6)
    argv += ["--variant-set", "loss.negatives.image_grounded_weight=2.5"] if name == "negatives" else []
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.syspath_prepend(str(script.parent))
    monkeypatch.chdir(REPO)
    monkeypatch.setattr(demo, "TRAIN_SAMPLES", demo.TRAIN_SAMPLES)  # --quick sets it; restored after the test
    runpy.run_path(str(script), run_name="__main__")
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["name"] == name and result["steps"] == 20 and result["seeds"] == [0]
    assert result["train_images"] == train_images
    for kind in ("baseline", "variant"):
        assert 0 <= result[kind][metric] <= 1 and 0 <= result[kind]["zeroshot_acc1"] <= 1
    assert result["delta"][metric] == pytest.approx(result["variant"][metric] - result["baseline"][metric])
    assert metric in result["targets"] and (tmp_path / f"replicate_{name}.json").is_file()
    if name == "pairs":  # the variant trains on its own shards, about as many images as --quick's per source
        sources = [("pairs", ["swap_attribute", "replace_object"], 0, 1998)]
        sources += [("pairs-1", ["replace_object"], 1_000_000, 2000)]
        for folder, kinds, start, images in sources:  # groups of three fill shards of 999, pairs of 1,000
            info = json.loads((tmp_path / folder / "_info.json").read_text())
            assert info["num_samples"] == images and info["counterfactual_pairs"] == kinds
            assert info["start_index"] == start and info["every_kind"] is True
            assert info["max_samples_per_shard"] == images // 2
        shards = next(o for o in result["variant_overrides"] if o.startswith("data.train_shards="))
        assert "pairs/shapes-" in shards and "pairs-1/shapes-" in shards
        assert "data.shuffle_buffer=64" in result["variant_overrides"]
    # the per-type accuracies are reported; the demo's test has 500 rows of each type
    kinds = ("swap_attribute", "replace_attribute", "replace_object")
    by_type = [result["baseline"][f"compositional_{t}"] for t in kinds]
    assert result["baseline"]["compositional_acc"] == pytest.approx(sum(by_type) / 3)
    for arm in ("baseline", "variant"):  # the "swap/replace attribute": the mean of those two types
        attribute = [result[arm][f"compositional_{t}"] for t in kinds[:2]]
        assert result[arm]["compositional_attribute_acc"] == pytest.approx(sum(attribute) / 2)
        color_size = attribute + [result[arm]["compositional_swap_size"]]  # and with the held-out size swap
        assert result[arm]["compositional_color_size_acc"] == pytest.approx(sum(color_size) / 3)
    if name == "negatives":
        assert result["variant_overrides"][-1] == "loss.negatives.image_grounded_weight=2.5"
        assert "loss.negatives.image_grounded_weight=6.0" in result["variant_overrides"]
        configs = {arm: (Path(result["runs"][arm][0]["run"]) / "config.yaml").read_text() for arm in result["runs"]}
        assert "image_grounded_weight: 2.5" in configs["variant"]
        assert "image_grounded_weight: 2.5" not in configs["baseline"]
    if not every:
        assert result["curve"] is None
        return
    # evaluated at steps 10 and 20 (the last); the last point is the final evaluation
    assert list(result["curve"]) == ["10", "20"]
    for point in result["curve"].values():
        assert point["delta"][metric] == pytest.approx(point["variant"][metric] - point["baseline"][metric])
    assert result["curve"]["20"]["variant"] == pytest.approx(result["variant"])


@pytest.mark.parametrize("bad", ["1500", "-1000"])
def test_train_images_must_fill_whole_shards(monkeypatch, capsys, bad):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import replicate_common

    monkeypatch.setattr(sys, "argv", ["replicate_negatives.py", "--train-images", bad])
    with pytest.raises(SystemExit) as exc:
        replicate_common.parse_args("negatives")
    assert exc.value.code == 2
    assert (
        f"--train-images must be a positive multiple of 1000 (shards of that size), got {bad}"
        in capsys.readouterr().err
    )


def test_pair_sources_stay_apart_from_the_held_out_scenes(tmp_path, monkeypatch):
    import argparse

    monkeypatch.syspath_prepend(str(REPO / "tools"))
    from replicate_pairs import pair_shards

    with pytest.raises(SystemExit, match="at most 10 --kinds sources"):
        pair_shards(tmp_path, 8, argparse.Namespace(kinds=["replace_object"] * 11, shuffle_buffer=0))
    with pytest.raises(SystemExit, match="--shuffle-buffer must be >= 0"):
        pair_shards(tmp_path, 8, argparse.Namespace(kinds=None, shuffle_buffer=-1))
    assert not any(tmp_path.iterdir())  # refused before writing anything
