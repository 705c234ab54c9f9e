"""tools/compositional_errors.py: its per-type accuracies equal `vlp eval --task compositional` on
the layout export_eval_layouts writes for the same scenes, and its splits add up."""

from __future__ import annotations

import json

import pytest
import torch

from tests.conftest import REPO, run_main

NUM, START = 30, 5_000_000


@pytest.fixture()
def tool(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tools"))
    import compositional_errors

    return compositional_errors


def test_per_type_accuracy_equals_vlp_eval_and_splits_add_up(tool, tmp_path):
    from vlp.eval.synthetic_layouts import export_eval_layouts
    from vlp.models.registry import build_model

    torch.manual_seed(0)
    model, _, _ = build_model("debug")
    ckpt = tmp_path / "debug.pt"
    torch.save(model.state_dict(), ckpt)
    layout = export_eval_layouts(tmp_path / "layouts", num_images=NUM, start_index=START, progress=False)
    out = tmp_path / "eval.json"
    run_main("eval", "--model", "debug", "--checkpoint", ckpt, "--task", "compositional", "--data",
             layout["compositional"], "--output", out, "--workers", "0")  # fmt: skip
    expected = json.loads(out.read_text())["metrics"]  # one task: one object

    got = tool.main(["--model", "debug", "--checkpoint", str(ckpt), "--num", str(NUM), "--start-index", str(START),
                     "--out", str(tmp_path / "errors.json")])  # fmt: skip
    assert json.loads((tmp_path / "errors.json").read_text()) == got
    for kind, v in got["by_type"].items():
        assert v["items"] == NUM and v["acc"] == pytest.approx(expected[f"acc_{kind}"], abs=1e-9), kind
        sizes = {k: s for k, s in got["by_size"].items() if k.startswith(f"{kind}/")}
        assert sum(s["items"] for s in sizes.values()) == NUM
        assert sum(s["acc"] * s["items"] for s in sizes.values()) == pytest.approx(v["acc"] * NUM)
    assert set(got["by_type"]) == {"swap_attribute", "replace_attribute", "replace_object", "swap_size"}
    # one group changes in a replacement, both in a swap; a size swap is between a small and a large group
    assert all("+" not in k for k in got["by_size"] if not k.startswith("swap_"))
    assert all("+" in k for k in got["by_size"] if k.startswith("swap_"))
    assert [k for k in got["by_size"] if k.startswith("swap_size/")] == ["swap_size/large+small"]
    assert sum(s["items"] for s in got["by_shape_replaced"].values()) == NUM


def test_changed_key_names_the_changed_groups(tool):
    small = {"shape": "star", "color": "red", "size": "small", "count": 2}
    large = {"shape": "circle", "color": "blue", "size": "large", "count": 1}
    swapped = [{**small, "color": "blue"}, {**large, "color": "red"}]
    assert tool.changed_key("swap_attribute", [small, large], swapped) == ("large+small", "")
    replaced = [small, {**large, "shape": "cross"}]
    assert tool.changed_key("replace_object", [small, large], replaced) == ("large", "circle")


def test_needs_a_model_or_checkpoint(tool, capsys):
    with pytest.raises(SystemExit):
        tool.main([])
    assert "give --checkpoint, --model or both" in capsys.readouterr().err
