"""The evaluation task registry (vlp.eval.registry): a task is one module; every entry holds a
loader, a runner and the options it takes; ``vlp eval --help`` lists exactly the registered tasks."""

from __future__ import annotations

import inspect
import json
import re
import sys

import pytest

from tests.conftest import png_bytes, run_main
from vlp.eval import registry
from vlp.eval.datasets import EvalData
from vlp.eval.registry import EvalTask, get_task, register, registered_tasks
from vlp.eval.run import build_specs

BUILT_IN = {"captioning", "compositional", "counting", "linear_probe", "zeroshot_classification", "zeroshot_retrieval"}

# A whole task, as a contributor would add it to vlp/eval/tasks/: nothing else is edited.
FEATURE_NORM_MODULE = '''
"""feature_norm: the mean norm of the image features (written by tests/test_eval_registry.py)."""

from pathlib import Path

from vlp.eval.datasets import EvalData, EvalDataError
from vlp.eval.registry import EvalTask, encode_images, register


def load_pngs(path):
    """Every ``*.png`` in the folder ``path``; EvalDataError when there is none."""
    images = sorted(str(p) for p in Path(path).glob("*.png"))
    if not images:
        raise EvalDataError(f"{path}: no .png files")
    return EvalData(images=images, name=Path(path).name)


def run_feature_norm(model, tokenizer, data, ctx):
    """num_images and mean_norm, the mean norm of their image features."""
    feats_ND, kept = encode_images(model, data, ctx)
    return {"num_images": len(kept), "mean_norm": float(feats_ND[kept].norm(dim=-1).mean())}


register(EvalTask("feature_norm", load=load_pngs, run=run_feature_norm, aliases=("norms",)))
'''


@pytest.fixture()
def task_folder(tmp_path, monkeypatch):
    """A folder on the path of the package vlp.eval.tasks: a module written there is a new task
    module. The registry and sys.modules are as before once the test ends."""
    import vlp.eval.tasks as package

    registered_tasks()  # the built-in tasks registered first, so that they stay registered after the test
    folder = tmp_path / "more_tasks"
    folder.mkdir()
    monkeypatch.setattr(package, "__path__", [*package.__path__, str(folder)])
    monkeypatch.setattr(registry, "_TASKS", dict(registry._TASKS))
    yield folder
    for module in folder.glob("*.py"):
        sys.modules.pop(f"vlp.eval.tasks.{module.stem}", None)


def _task_help() -> str:
    """The help of ``vlp eval --task``, on one line."""
    text = " ".join(run_main("eval", "--help").stdout.split())
    return text.rsplit("--task TASK ", 1)[1].split(" (repeatable)", 1)[0]  # the last: under options, not usage


def test_a_new_task_is_one_new_module(task_folder, tmp_path):
    (task_folder / "feature_norm.py").write_text(FEATURE_NORM_MODULE)
    images = tmp_path / "pngs"
    images.mkdir()
    for i, color in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        (images / f"{i}.png").write_bytes(png_bytes(color=color))
    out = tmp_path / "results.json"
    args = ["--model", "debug", "--data", images, "--output", out, "--workers", "0", "--device", "cpu"]
    proc = run_main("eval", "--task", "norms", *args)  # by its alias
    assert f"results in {out}" in proc.stdout and "feature_norm" in proc.stdout and "mean_norm" in proc.stdout
    result = json.loads(out.read_text())
    assert (result["task"], result["dataset"], result["model"]) == ("feature_norm", "pngs", "debug")
    assert result["metrics"]["num_images"] == 3 and result["metrics"]["mean_norm"] > 0
    assert "feature_norm (alias norms)" in _task_help()
    proc = run_main("eval", "--task", "feature_norm", "--data", tmp_path, "--model", "debug", check=False)
    assert proc.returncode == 2 and f"{tmp_path}: no .png files" in proc.stderr  # its loader's EvalDataError


def test_every_task_has_a_loader_a_runner_and_documented_options():
    help_text = " ".join(run_main("eval", "--help").stdout.split())
    tasks = registered_tasks()
    assert set(tasks) >= BUILT_IN
    for task in tasks.values():
        assert callable(task.load) and inspect.getdoc(task.load), task.name
        assert callable(task.run) and inspect.getdoc(task.run), task.name
        inspect.signature(task.run).bind("model", "tokenizer", "data", "ctx")
        inspect.signature(task.load).bind("path", **dict.fromkeys(task.options, "x"))  # options: keywords of load
        for option in task.options:
            assert f"--{option.replace('_', '-')} " in help_text, (task.name, option)  # a vlp eval option


def test_eval_help_lists_exactly_the_registered_tasks():
    listed = _task_help().split(" | ")
    assert [re.sub(r" \(.*\)$", "", entry) for entry in listed] == list(registered_tasks())
    assert "zeroshot_retrieval (alias retrieval)" in listed
    assert "captioning (CoCa models; needs pycocoevalcap)" in listed


def test_aliases_and_taken_names():
    assert get_task("retrieval") is get_task("zeroshot_retrieval")
    counting = get_task("counting")
    with pytest.raises(ValueError, match="'retrieval' is taken by the task 'zeroshot_retrieval'"):
        register(EvalTask("retrieval", load=counting.load, run=counting.run))
    with pytest.raises(ValueError, match="'counting' is taken"):
        register(EvalTask("count", load=counting.load, run=counting.run, aliases=("counting",)))
    assert "count" not in registered_tasks()


def test_options_reach_only_the_tasks_that_take_them(task_folder, tmp_path):
    calls = []

    def load_echo(path, images_root=None):
        """Records its arguments."""
        calls.append((path, images_root))
        return EvalData(images=[], name=str(path))

    register(EvalTask("echo", load=load_echo, run=lambda *a: {}, options=("images_root",)))
    specs = build_specs(["echo", "echo"], ["a", "b"], images_root="root", classnames=["x"])
    assert [(task.name, data.name) for task, data in specs] == [("echo", "a"), ("echo", "b")]
    assert calls == [("a", "root"), ("b", "root")]  # classnames: a zero-shot option, not passed here
    build_specs(["echo"], ["c"], images_root="", templates=None)
    assert calls[-1] == ("c", None)  # empty options are left out
    with pytest.raises(TypeError, match="no eval task takes the option.* image_root"):
        build_specs(["echo"], ["d"], image_root="typo")
