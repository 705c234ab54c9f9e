"""CLIP_benchmark's WebDataset layout by name: shards written by CLIP_benchmark's own converter,
`vlp eval --dataset wds/NAME --dataset_root ROOT` against `clip_benchmark eval` on the same data and
checkpoint, and the per-result JSON files that `clip_benchmark build` aggregates."""

from __future__ import annotations

import builtins
import csv
import json
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_main
from tools.bench.eval_wds import ConverterInput

cb_builder = pytest.importorskip("clip_benchmark.webdataset_builder")

CLASSES = ["red circle", "blue square", "green triangle", "yellow star"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]


def _image(g):
    return Image.fromarray(g.integers(0, 256, (48, 80, 3), dtype=np.uint8))


@pytest.fixture(scope="module")
def benchmark_root(tmp_path_factory):
    """`wds_cls` (classification, 12 images in 3 shards) and `wds_ret` (retrieval, 10 images with
    three captions each, in 2 shards), written by clip_benchmark.webdataset_builder."""
    root = tmp_path_factory.mktemp("cb")
    g = np.random.default_rng(0)
    cls = ConverterInput([(_image(g), i % 4) for i in range(12)], CLASSES, TEMPLATES)
    cb_builder.convert_dataset(cls, "test", str(root / "wds_cls"), max_count=5, verbose=False)
    words = ["cat", "dog", "car", "tree", "boat", "lamp", "cup", "bird", "shoe", "kite"]
    ret = ConverterInput([(_image(g), [f"a {w}", f"the {w} on a table", f"one {w} outside"]) for w in words])
    cb_builder.convert_retrieval_dataset(ret, "test", str(root / "wds_ret"), max_count=6, verbose=False)
    return root


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    import open_clip

    from vlp.checkpoint import architectures

    architectures.register()  # `debug` for open_clip, hence for CLIP_benchmark's loader too
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ckpt") / "debug.pt"
    torch.save(open_clip.create_model("debug").state_dict(), path)
    return path


def _clip_benchmark(monkeypatch, argv):
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as zc

    # clip-benchmark 1.6.2 calls float() on a 1-element array, which numpy >= 2.4 rejects
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *argv])
    cli.main()


def test_vlp_eval_by_dataset_name_equals_clip_benchmark(benchmark_root, checkpoint, tmp_path, monkeypatch):
    """CLIP_benchmark runs with --no_amp: its default autocasts (bf16 on CPU, fp16 on GPU), which moves
    near-tied retrieval ranks; vlp evaluates in fp32."""
    root = str(benchmark_root / "wds_{dataset}")
    ours = tmp_path / "ours"
    proc = run_main(
        "eval", "--dataset", "wds/cls", "--dataset", "wds/ret", "--dataset_root", root,
        "--model", "debug", "--checkpoint", checkpoint, "--output", f"{ours}/", "--batch-size", "64", "--workers", "0",
    )  # fmt: skip
    assert "| zeroshot_classification | wds/cls" in proc.stdout  # the markdown table
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    common = ["--dataset_root", root, "--model", "debug", "--pretrained", str(checkpoint), "--batch_size", "64"]
    common += [
        "--no_amp",
        "--recall_k",
        "1",
        "5",
        "10",
        "--num_workers",
        "0",
        "--output",
        f"{theirs}/{{dataset}}_{{pretrained}}_{{model}}_{{language}}_{{task}}.json",
    ]
    _clip_benchmark(monkeypatch, ["eval", "--dataset", "wds/cls", "--task", "zeroshot_classification", *common])
    _clip_benchmark(monkeypatch, ["eval", "--dataset", "wds/ret", "--task", "zeroshot_retrieval", *common])

    names = sorted(p.name for p in theirs.glob("*.json"))
    assert names == sorted(p.name for p in ours.glob("*.json")), "files named as CLIP_benchmark names them"
    assert names == [
        "cls_debug.pt_debug_en_zeroshot_classification.json",
        "ret_debug.pt_debug_en_zeroshot_retrieval.json",
    ]
    for name in names:
        a, b = json.loads((ours / name).read_text()), json.loads((theirs / name).read_text())
        assert (a["dataset"], a["task"], a["model"], a["language"]) == (
            b["dataset"],
            b["task"],
            b["model"],
            b["language"],
        )
        for key, value in b["metrics"].items():
            assert a["metrics"][key] == pytest.approx(value, abs=1e-6, nan_ok=True), (name, key)

    # clip_benchmark build aggregates vlp's files with its own
    _clip_benchmark(monkeypatch, ["build", str(ours), str(theirs), "--output", str(tmp_path / "bench.csv")])
    rows = list(csv.DictReader((tmp_path / "bench.csv").read_text().splitlines()))
    assert len(rows) == 4 and {r["dataset"] for r in rows} == {"wds/cls", "wds/ret"}
    table = list(csv.DictReader((ours / "results.csv").read_text().splitlines()))
    assert {r["metric"] for r in table} >= {"acc1", "image_retrieval_recall@1"}


def test_retrieval_reads_every_line_of_txt_as_a_caption(benchmark_root):
    from vlp.eval import benchmark_wds

    ds = benchmark_wds.locate("wds/ret", str(benchmark_root / "wds_{dataset}"))
    assert benchmark_wds.default_task(ds) == "zeroshot_retrieval"
    data = benchmark_wds.load(ds, "zeroshot_retrieval")
    assert len(data.images) == 10 and len(data.captions) == 30
    assert data.captions[:3] == ["a cat", "the cat on a table", "one cat outside"]
    assert data.text_to_image[:4] == [0, 0, 0, 1]


def test_classification_reads_classnames_and_templates_of_the_layout(benchmark_root):
    from vlp.eval import benchmark_wds

    ds = benchmark_wds.locate("wds/cls", str(benchmark_root / "wds_{dataset}"))
    data = benchmark_wds.load(ds, benchmark_wds.default_task(ds))
    assert (data.classnames, data.templates, data.labels) == (CLASSES, TEMPLATES, [i % 4 for i in range(12)])


def test_missing_layout_files_are_one_line_naming_the_file(benchmark_root, tmp_path):
    from vlp.eval.datasets import EvalDataError

    proc = run_main(
        "eval", "--dataset", "wds/nope", "--dataset_root", str(benchmark_root / "wds_{dataset}"), "--model", "debug",
        check=False,
    )  # fmt: skip
    assert proc.returncode == 2 and "wds_nope/test/nshards.txt: not found" in proc.stderr
    from vlp.eval import benchmark_wds

    with pytest.raises(EvalDataError, match="unknown key 'name'"):
        benchmark_wds.locate("wds/cls", str(tmp_path / "{name}"))


def test_hub_urls_read_metadata_raw_and_tars_resolved():
    from vlp.eval import benchmark_wds

    ds = benchmark_wds.locate("wds/vtab/cifar10", "hf://datasets/clip-benchmark/wds_{dataset_cleaned}")
    assert ds.metadata == "https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/raw/main"
    assert ds.tars == "https://huggingface.co/datasets/clip-benchmark/wds_vtab-cifar10/resolve/main"


def test_suite_skips_what_is_missing_resumes_and_averages(benchmark_root, checkpoint, tmp_path):
    """A suite (here a YAML file of the shape of vlp/eval/suite_lists/*.yaml): a missing dataset and an
    unsupported task are named and skipped; a re-run reads the finished datasets' files instead of
    evaluating them again; the average is over the tasks scored."""
    suite = tmp_path / "mine.yaml"
    suite.write_text(
        "name: mine\naverage: mean of the main metrics\ntasks:\n"
        "  - {dataset: wds/cls, name: Classes, main_metric: mean_per_class_recall}\n"
        "  - {dataset: wds/ret, name: Captions, task: zeroshot_retrieval, main_metric: mean_recall@1}\n"
        "  - {dataset: wds/absent, name: Absent, main_metric: acc1}\n"
        "  - {dataset: wds/cls, name: Odd, main_metric: acc_wg, unsupported: worst-group metadata}\n"
    )
    out = tmp_path / "suite"
    args = ["eval", "--suite", str(suite), "--dataset_root", str(benchmark_root / "wds_{dataset}"), "--model", "debug",
            "--checkpoint", checkpoint, "--output", f"{out}/", "--batch-size", "64", "--workers", "0"]  # fmt: skip
    first = run_main(*args)
    assert "skipped: Absent (wds/absent) is not there" in first.stdout
    assert "not scored: Odd (wds/cls): needs worst-group metadata" in first.stdout
    assert "over 2 of 4 tasks" in first.stdout
    summary = json.loads((out / "mine_summary.json").read_text())
    files = {p.name: json.loads(p.read_text()) for p in out.glob("*_en_*.json")}
    cls = next(v for k, v in files.items() if k.startswith("cls_"))["metrics"]
    ret = next(v for k, v in files.items() if k.startswith("ret_"))["metrics"]
    expected = (
        cls["mean_per_class_recall"] + (ret["image_retrieval_recall@1"] + ret["text_retrieval_recall@1"]) / 2
    ) / 2
    assert summary["average"] == pytest.approx(expected) and summary["tasks_scored"] == 2

    # a suite killed after its first dataset: only the second is evaluated again
    next(out.glob("ret_*.json")).unlink()
    second = run_main(*args)
    assert "done before: Classes" in second.stdout and "mine: Captions (wds/ret" in second.stdout
    assert "mine: Classes (wds/cls" not in second.stdout
    assert json.loads((out / "mine_summary.json").read_text())["average"] == pytest.approx(expected)


def test_named_suites_load():
    from vlp.eval.suites import list_suites, load_suite

    assert {"datacomp", "imagenet_robustness", "retrieval", "compositional"} <= set(list_suites())
    datacomp = load_suite("datacomp")
    assert len(datacomp.tasks) == 38
    assert {t.main_metric for t in datacomp.tasks if t.dataset == "wds/vtab/pets"} == {"mean_per_class_recall"}
    with pytest.raises(Exception, match="unknown suite 'nope'; suites: compositional, datacomp"):
        load_suite("nope")


def test_training_evaluates_datasets_and_suites_by_name(benchmark_root, shapes_shards, tmp_path):
    from tests.distributed import backend_run_sets
    from vlp.train.logging import read_metrics

    suite = tmp_path / "mine.yaml"
    suite.write_text(
        "name: mine\ntasks:\n  - {dataset: wds/ret, name: Captions, main_metric: mean_recall@1}\n"
        "  - {dataset: wds/absent, name: Absent, main_metric: acc1}\n"
    )
    out = tmp_path / "run"
    sets = backend_run_sets(
        shapes_shards, out, "train.steps=2", f"eval.datasets=[wds/cls, 'suite/{suite}']",
        f"eval.dataset_root={benchmark_root / 'wds_{dataset}'}",
    )  # fmt: skip
    run_main("train", "--config", "configs/demo.yaml", *sets)
    evals = [r for r in read_metrics(out / "metrics.jsonl") if any(k.startswith("eval/") for k in r)]
    last = evals[-1]
    assert "eval/wds/cls/zeroshot_classification/acc1" in last
    assert "eval/wds/ret/zeroshot_retrieval/image_retrieval_recall@1" in last
    ret = (
        last["eval/wds/ret/zeroshot_retrieval/image_retrieval_recall@1"]
        + last["eval/wds/ret/zeroshot_retrieval/text_retrieval_recall@1"]
    ) / 2
    assert last["eval/suite/mine/average"] == pytest.approx(ret) and last["eval/suite/mine/tasks_scored"] == 1


def test_dataset_root_over_http(benchmark_root, checkpoint, tmp_path):
    """--dataset_root as an http URL (metadata by urllib, tars through the shard reader), served by a
    local server the test starts; the numbers equal the local folder's."""
    import functools
    import http.server
    import threading

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(benchmark_root))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        results = {}
        for where, root in (("http", f"http://127.0.0.1:{server.server_port}/wds_{{dataset}}"),
                            ("local", str(benchmark_root / "wds_{dataset}"))):  # fmt: skip
            out = tmp_path / where
            run_main("eval", "--dataset", "wds/cls", "--dataset", "wds/ret", "--dataset_root", root, "--model", "debug",
                     "--checkpoint", checkpoint, "--output", f"{out}/", "--workers", "0")  # fmt: skip
            results[where] = {p.name: json.loads(p.read_text())["metrics"] for p in out.glob("*_en_*.json")}
    finally:
        server.shutdown()
    assert len(results["http"]) == 2
    assert json.dumps(results["http"], sort_keys=True) == json.dumps(results["local"], sort_keys=True)


def test_dataset_root_as_a_pipe_command(benchmark_root, checkpoint, tmp_path):
    """--dataset_root 'pipe:CMD PREFIX': every file's path is appended to the command, as CLIP_benchmark
    joins paths to its root (shards as webdataset pipe: urls, the metadata files the same way); the
    numbers equal the local folder's, and a dataset that is not there is one line naming the command."""
    from vlp.eval import benchmark_wds

    results = {}
    for where, root in (("pipe", f"pipe:cat {benchmark_root}/wds_{{dataset}}"),
                        ("local", str(benchmark_root / "wds_{dataset}"))):  # fmt: skip
        out = tmp_path / where
        run_main("eval", "--dataset", "wds/cls", "--dataset", "wds/ret", "--dataset_root", root, "--model", "debug",
                 "--checkpoint", checkpoint, "--output", f"{out}/", "--workers", "0")  # fmt: skip
        results[where] = {p.name: json.loads(p.read_text())["metrics"] for p in out.glob("*_en_*.json")}
    assert len(results["pipe"]) == 2
    assert json.dumps(results["pipe"], sort_keys=True) == json.dumps(results["local"], sort_keys=True)
    ds = benchmark_wds.locate("wds/nope", f"pipe:cat {benchmark_root}/wds_{{dataset}}")
    with pytest.raises(benchmark_wds.DatasetMissing, match=r"wds_nope/test/nshards.txt: the command failed \(exit 1\)"):
        benchmark_wds.shard_urls(ds, "test")


def test_remote_shards_are_spooled_not_held(tmp_path):
    """A remote dataset's images are written to a spool file as its shards stream past: loading it
    holds about one sample in memory, not the set; the spool goes with the EvalData."""
    import gc
    import io
    import os
    import tracemalloc

    from tests.conftest import write_tar
    from vlp.eval import benchmark_wds
    from vlp.eval.tar_index import TarSlice

    folder = tmp_path / "wds_big"
    (folder / "test").mkdir(parents=True)
    g = np.random.default_rng(3)
    images = []
    for _ in range(24):
        buf = io.BytesIO()
        Image.fromarray(g.integers(0, 256, (256, 256, 3), dtype=np.uint8)).save(buf, format="png")
        images.append(buf.getvalue())
    for shard in range(2):
        samples = [
            {"__key__": f"s{i:07d}", "png": images[i], "cls": str(i % 4).encode()}
            for i in range(12 * shard, 12 * shard + 12)
        ]
        write_tar(folder / "test" / f"{shard}.tar", samples)
    (folder / "test" / "nshards.txt").write_text("2\n")
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")

    import webdataset.gopen  # noqa: F401

    import vlp.data.stream  # noqa: F401 - imported before measuring: modules are no data

    ds = benchmark_wds.locate("wds/big", f"pipe:cat {tmp_path}/wds_{{dataset}}")
    tracemalloc.start()
    data = benchmark_wds.load(ds, "zeroshot_classification")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    total = sum(len(b) for b in images)
    assert all(isinstance(x, TarSlice) for x in data.images) and data.images[5].read() == images[5]
    assert data.labels == [i % 4 for i in range(24)]
    assert peak < 5 * max(len(b) for b in images) < total / 4, (peak, total)  # 24 images of ~200 kB
    spool = data.spool.folder
    assert os.path.isdir(spool)
    del data
    gc.collect()
    assert not os.path.exists(spool)
