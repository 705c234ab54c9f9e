"""Multilabel CLIP_benchmark datasets (mean average precision, against `clip_benchmark eval` on shards
its own converter wrote) and DataComp's own metrics (WILDS' macro F1 and grouped accuracies, the
fairness sets' worst groups): unit tests on hand-computed values, and `vlp eval --dataset wds/...` on
shards with DataComp's field layout (cls label, npy metadata row) against a reference computed here
from CLIP_benchmark's own logits."""

from __future__ import annotations

import builtins
import io
import json
import math
import sys
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_main
from tools.bench.eval_wds import ConverterInput

cb_builder = pytest.importorskip("clip_benchmark.webdataset_builder")

CLASSES = ["red circle", "blue square", "green triangle", "yellow star", "purple cross", "white ring"]
TEMPLATES = ["a photo of a {c}.", "a drawing of a {c}."]


def _image(g, i=0):
    """Noise, a flat colour or a colour ramp, by turns: unlike each other to the model below."""
    if i % 3 == 0:
        return Image.fromarray(g.integers(0, 256, (48, 80, 3), dtype=np.uint8))
    if i % 3 == 1:
        return Image.fromarray(np.full((48, 80, 3), g.integers(0, 256, 3), dtype=np.uint8))
    return Image.fromarray(
        (np.linspace(0, 255, 80)[None, :, None] * np.ones((48, 1, 3)) * g.random(3)).astype(np.uint8)
    )


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    import open_clip

    from vlp.checkpoint import architectures

    architectures.register()  # `debug` for open_clip, hence for CLIP_benchmark's loader too
    torch.manual_seed(0)
    model = open_clip.create_model("debug")
    with torch.no_grad():  # random weights predict one class for every image unless these shared parts go
        model.visual.class_embedding.zero_()
        model.visual.positional_embedding.zero_()
    path = tmp_path_factory.mktemp("ckpt") / "debug.pt"
    torch.save(model.state_dict(), path)
    return path


def _clip_benchmark(monkeypatch, argv):
    from clip_benchmark import cli
    from clip_benchmark.metrics import zeroshot_classification as zc

    # clip-benchmark 1.6.2 calls float() on a 1-element array, which numpy >= 2.4 rejects
    monkeypatch.setattr(zc, "float", lambda x: builtins.float(np.asarray(x).item()), raising=False)
    monkeypatch.setattr(sys, "argv", ["clip_benchmark", *argv])
    cli.main()


# ---- multilabel -------------------------------------------------------------------------------


def test_average_precision_hand_computed():
    """Class 0: scores rank samples 2, 0, 1, 3 and the positives are 2 and 1 (ranks 1 and 3):
    AP = (1/1 + 2/3) / 2. Class 1: one positive ranked 2nd: AP = 1/2. Class 2: no positive: 0."""
    from vlp.eval.zeroshot import average_precision_per_class, multilabel_classify

    scores = torch.tensor([[0.8, 0.1, 0.0], [0.3, 0.9, 0.0], [0.9, 0.5, 0.0], [0.1, 0.2, 0.0]])
    targets = torch.tensor([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 0]])
    ap = average_precision_per_class(scores, targets)
    assert ap.tolist() == pytest.approx([(1 + 2 / 3) / 2, 0.5, 0.0])
    feats = torch.eye(3)[[0, 1, 2, 0]]
    metrics = multilabel_classify(feats, torch.eye(3), targets)
    assert metrics["num_samples"] == 4 and metrics["num_classes"] == 3
    with pytest.raises(ValueError, match="NaN"):
        average_precision_per_class(torch.full((2, 2), float("nan")), torch.zeros(2, 2))


@pytest.fixture(scope="module")
def multilabel_root(tmp_path_factory):
    """`wds_ml`: 14 images, each with a 0/1 vector of 6 classes (the last class never present),
    written by clip_benchmark.webdataset_builder with multilabel=True, 5 a shard."""
    root = tmp_path_factory.mktemp("ml")
    g = np.random.default_rng(1)
    items = []
    for i in range(14):
        vector = torch.zeros(len(CLASSES))
        vector[[i % 5, (i * 3 + 1) % 5]] = 1
        items.append((_image(g, i), vector))
    data = ConverterInput(items, CLASSES, TEMPLATES)
    cb_builder.convert_dataset(data, "test", str(root / "wds_ml"), max_count=5, multilabel=True, verbose=False)
    return root


def test_multilabel_equals_clip_benchmark(multilabel_root, model_file, tmp_path, monkeypatch):
    from vlp.eval import benchmark_wds

    root = str(multilabel_root / "wds_{dataset}")
    ds = benchmark_wds.locate("wds/ml", root)
    assert benchmark_wds.default_task(ds) == "zeroshot_classification"
    data = benchmark_wds.load(ds, "zeroshot_classification")
    assert len(data.multilabels) == 14 and data.multilabels[0].tolist() == [1, 1, 0, 0, 0, 0]

    ours = tmp_path / "ours"
    run_main("eval", "--dataset", "wds/ml", "--dataset_root", root, "--model", "debug", "--checkpoint", model_file,
             "--output", f"{ours}/", "--batch-size", "64", "--workers", "0")  # fmt: skip
    theirs = tmp_path / "theirs"
    theirs.mkdir()
    _clip_benchmark(monkeypatch, [
        "eval", "--dataset", "wds/ml", "--task", "zeroshot_classification", "--dataset_root", root,
        "--model", "debug", "--pretrained", str(model_file), "--batch_size", "64", "--no_amp", "--num_workers", "0",
        "--output", f"{theirs}/{{dataset}}_{{pretrained}}_{{model}}_{{language}}_{{task}}.json",
    ])  # fmt: skip
    name = "ml_debug.pt_debug_en_zeroshot_classification.json"
    a, b = json.loads((ours / name).read_text()), json.loads((theirs / name).read_text())
    assert set(b["metrics"]) == {"mean_average_precision"}
    assert a["metrics"]["mean_average_precision"] == pytest.approx(b["metrics"]["mean_average_precision"], abs=1e-6)
    assert a["metrics"]["num_samples"] == 14


# ---- DataComp's metrics: unit tests -----------------------------------------------------------


def test_macro_f1_and_recall_hand_computed():
    """labels 0 0 1 1 2, predictions 0 1 1 1 3 (3 is never a label: not averaged, still a miss).
    class 0: TP 1, FP 0, FN 1 -> F1 2/3, recall 1/2; class 1: TP 2, FP 1, FN 0 -> F1 4/5, recall 1;
    class 2: TP 0 -> F1 0, recall 0."""
    from vlp.eval.datacomp_metrics import macro_f1_recall

    f1, recall = macro_f1_recall(torch.tensor([0, 1, 1, 1, 3]), torch.tensor([0, 0, 1, 1, 2]))
    assert f1 == pytest.approx((2 / 3 + 4 / 5 + 0) / 3)
    assert recall == pytest.approx((1 / 2 + 1 + 0) / 3)
    sklearn = pytest.importorskip("sklearn.metrics")
    y, p = [0, 0, 1, 1, 2], [0, 1, 1, 1, 3]
    assert f1 == pytest.approx(sklearn.f1_score(y, p, average="macro", labels=np.unique(y)))


def test_grouped_accuracy_hand_computed():
    """Groups by column 1 with values 0, 2, 2, 3, 3, 3: group 1 is empty (nan, count 0, not the
    worst); accuracies 1, 1/2, 1/3; worst 1/3."""
    from vlp.eval.datacomp_metrics import MetadataError, grouped

    correct = torch.tensor([1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    metadata = torch.tensor([[9, 0], [9, 2], [9, 2], [9, 3], [9, 3], [9, 3]])
    out, worst = grouped("acc", correct, metadata, ("a", "b"), "b")
    assert worst == pytest.approx(1 / 3)
    assert out["acc_b:0"] == 1.0 and out["acc_b:2"] == 0.5 and out["acc_b:3"] == pytest.approx(1 / 3)
    assert math.isnan(out["acc_b:1"]) and out["count_b:1"] == 0 and out["count_b:3"] == 3
    with pytest.raises(MetadataError, match="negative"):
        grouped("acc", correct, -metadata, ("a", "b"), "b")
    with pytest.raises(MetadataError, match="'b' is column 1"):
        grouped("acc", correct, metadata[:, :1], ("a", "b"), "b")


def test_each_datacomp_evaluator_hand_computed():
    from vlp.eval.datacomp_metrics import EVALUATORS, datacomp_metrics, evaluator_name

    # sample i ranks class i first (6), then 5, 4, 3 (scores 4, 3, 2), class 0 or 1 last
    logits = torch.tensor([[6.0, 0, 1, 2, 3, 4], [0, 6.0, 1, 2, 3, 4], [0, 1, 6.0, 2, 3, 4], [0, 1, 2, 6.0, 3, 4]])
    labels = torch.tensor([0, 2, 2, 0])
    # top-1 right: samples 0 and 2. Top-5: sample 1's label (score 1) is 5th, sample 3's (score 0) 6th.
    rows = {  # DataComp's npy columns of each set
        "wilds/fmow": [[0, 1, 0], [1, 1, 0], [0, 0, 0], [1, 0, 0]],  # region, year, y
        "wilds/camelyon17": [[2, 1, 0], [2, 1, 0], [2, 1, 0], [2, 2, 0]],  # hospital, slide, y
        "dollar_street": [[0, 5, 1], [0, 5, 1], [1, 5, 1], [1, 5, 1]],  # income_ds, income_meta, region
        "geode": [[0, 7], [1, 7], [1, 7], [1, 7]],  # region, country
    }
    m = {name: datacomp_metrics(name, logits, labels, torch.tensor(r)) for name, r in rows.items()}
    fmow = m["wilds/fmow"]
    assert fmow["acc_avg"] == 0.5
    assert (fmow["acc_region:0"], fmow["acc_region:1"], fmow["acc_worst_region"]) == (1.0, 0.0, 0.0)
    assert (fmow["acc_year:0"], fmow["acc_year:1"], fmow["acc_worst_year"]) == (0.5, 0.5, 0.5)
    assert (fmow["count_region:0"], fmow["count_year:1"]) == (2, 2)
    camelyon = m["wilds/camelyon17"]
    assert camelyon["acc_slide:1"] == pytest.approx(2 / 3) and camelyon["acc_slide:2"] == 0.0
    assert camelyon["acc_wg"] == 0.0 and camelyon["count_slide:0"] == 0 and math.isnan(camelyon["acc_slide:0"])
    street = m["dollar_street"]
    assert street["acc_top5_avg"] == 0.75
    assert (street["acc_top5_income_ds:0"], street["acc_top5_income_ds:1"], street["acc_top5_wg"]) == (1.0, 0.5, 0.5)
    geode = m["geode"]
    assert (geode["acc_avg"], geode["acc_region:0"], geode["acc_wg"]) == (0.5, 1.0, pytest.approx(1 / 3))
    # iWildCam, no metadata: predictions 0 1 2 3; classes 0 and 2 each TP 1, FN 1, FP 0: F1 2/3, recall 1/2
    iwildcam = datacomp_metrics("wilds/iwildcam", logits, labels, None)
    assert iwildcam["F1-macro_all"] == pytest.approx(2 / 3) and iwildcam["recall-macro_all"] == 0.5
    assert iwildcam["acc_avg"] == 0.5
    assert evaluator_name("wds/fairness/geode") == "geode" and evaluator_name("wds/cifar10") == ""
    assert set(EVALUATORS) == {"wilds/iwildcam", "wilds/camelyon17", "wilds/fmow", "dollar_street", "geode"}
    with pytest.raises(ValueError, match="needs each sample's metadata"):
        datacomp_metrics("geode", logits, labels, None)


# ---- DataComp's metrics: end to end on shards with DataComp's layout ----------------------------

# name -> metadata row of sample i (DataComp's npy columns for that set)
DATACOMP_SETS = {
    "wilds/iwildcam": lambda i: [i % 3, i, 2013, 1 + i % 12, 1, 0, 0, 0, i % 6],
    "wilds/camelyon17": lambda i: [2, 3 + i % 4, i % 6],
    "wilds/fmow": lambda i: [i % 4, i % 3, i % 6],
    "dollar_street": lambda i: [i % 4, 100 * i, i % 2],
    "geode": lambda i: [i % 4, i % 5],
}


def _write_datacomp_set(folder, name, g, n=18):
    """DataComp's copy of a set: test/{0,1}.tar with webp, cls, npy (the metadata row), classnames
    and templates; no dataset_type.txt (DataComp's download_evalsets.py fetches none)."""
    (folder / "test").mkdir(parents=True)
    (folder / "classnames.txt").write_text("\n".join(CLASSES) + "\n")
    (folder / "zeroshot_classification_templates.txt").write_text("\n".join(TEMPLATES) + "\n")
    (folder / "test" / "nshards.txt").write_text("2\n")
    for shard in range(2):
        with tarfile.open(folder / "test" / f"{shard}.tar", "w") as tar:
            for i in range(shard * n // 2, (shard + 1) * n // 2):
                image = io.BytesIO()
                _image(g, i).save(image, format="webp", lossless=True)
                row = io.BytesIO()
                np.save(row, np.asarray(DATACOMP_SETS[name](i), dtype=np.int64))
                label = str(0 if i % 3 == 2 else i % 6).encode()  # the ramps are mostly class 0 to the model
                for ext, data in (("webp", image.getvalue()), ("cls", label), ("npy", row.getvalue())):
                    info = tarfile.TarInfo(f"s{i:07d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def datacomp_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("datacomp")
    g = np.random.default_rng(2)
    for name in DATACOMP_SETS:
        _write_datacomp_set(root / f"wds_{name.replace('/', '-')}_test", name, g)
    return root


def _reference(root, model_file, name):
    """Logits by CLIP_benchmark's own data pipeline and classifier, labels and metadata rows read
    with webdataset: what DataComp's eval_utils compute its metrics from."""
    import webdataset as wds
    from clip_benchmark.datasets.builder import build_dataset
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.models import load_clip

    model, transform, tokenizer = load_clip("open_clip", "debug", str(model_file), cache_dir=None, device="cpu")
    model.eval()
    folder = root / f"wds_{name.replace('/', '-')}_test"
    dataset = build_dataset(f"wds/{name}", root=str(folder), transform=transform, split="test", download=False)
    classifier = zc.zero_shot_classifier(model, tokenizer, dataset.classes, dataset.templates, "cpu", amp=False)
    loader = torch.utils.data.DataLoader(dataset.batched(64), batch_size=None)
    logits, labels = zc.run_classification(model, classifier, loader, "cpu", amp=False)
    rows = [
        np.load(io.BytesIO(s["npy"])) for s in wds.WebDataset(str(folder / "test" / "{0..1}.tar"), shardshuffle=False)
    ]
    return logits.double().numpy(), labels.numpy(), np.stack(rows)


def _expected(name, logits, labels, metadata):
    """DataComp's metrics of ``name`` computed here with plain loops (WILDS' definitions)."""
    order = np.argsort(-logits, axis=1, kind="stable")
    top1, top5 = order[:, 0] == labels, (order[:, :5] == labels[:, None]).any(1)

    def by(metric, correct, field, col, worst):
        accs = {g: correct[metadata[:, col] == g].mean() for g in set(metadata[:, col].tolist())}
        return {**{f"{metric}_{field}:{g}": v for g, v in accs.items()}, worst: min(accs.values())}

    if name == "wilds/iwildcam":
        pred = order[:, 0]
        f1 = [2 * ((pred == c) & (labels == c)).sum() / ((pred == c).sum() + (labels == c).sum()) for c in set(labels)]
        return {"F1-macro_all": np.mean(f1), "acc_avg": top1.mean()}
    if name == "wilds/fmow":
        return {**by("acc", top1, "region", 0, "acc_worst_region"), **by("acc", top1, "year", 1, "acc_worst_year")}
    if name == "dollar_street":
        return {**by("acc_top5", top5, "income_ds", 0, "acc_top5_wg"), "acc_top5_avg": top5.mean()}
    field, col = ("slide", 1) if name == "wilds/camelyon17" else ("region", 0)
    return {**by("acc", top1, field, col, "acc_wg"), "acc_avg": top1.mean()}


def test_datacomp_metrics_end_to_end(datacomp_root, model_file, tmp_path):
    out = tmp_path / "out"
    args = ["eval", "--dataset_root", str(datacomp_root / "wds_{dataset_cleaned}_test"), "--model", "debug",
            "--checkpoint", model_file, "--output", f"{out}/", "--batch-size", "64", "--workers", "0"]  # fmt: skip
    for name in DATACOMP_SETS:
        args += ["--dataset", f"wds/{name}"]
    run_main(*args)
    for name in DATACOMP_SETS:
        metrics = json.loads(next(out.glob(f"{name.replace('/', '_')}_*.json")).read_text())["metrics"]
        expected = _expected(name, *_reference(datacomp_root, model_file, name))
        for key, value in expected.items():
            assert metrics[key] == pytest.approx(value, abs=1e-6), (name, key)
        assert metrics["acc1"] == pytest.approx(metrics.get("acc_avg", metrics["acc1"]))
        assert metrics.get("acc_top5_avg", metrics["acc5"]) == pytest.approx(metrics["acc5"])


def test_datacomp_suite_scores_its_metrics(datacomp_root, model_file, tmp_path):
    """The datacomp suite on a root holding only these five: each is scored by DataComp's main metric
    (Camelyon17 by acc1), WinoGAViL (not there) is named as skipped, the average is over the five."""
    out = tmp_path / "suite"
    root = str(datacomp_root / "wds_{dataset_cleaned}_test")
    proc = run_main("eval", "--suite", "datacomp", "--dataset_root", root, "--model", "debug",
                    "--checkpoint", model_file, "--output", f"{out}/", "--workers", "0")  # fmt: skip
    assert "skipped: WinoGAViL" in proc.stdout and "over 5 of 38 tasks" in proc.stdout
    summary = json.loads((out / "datacomp_summary.json").read_text())
    rows = {row["dataset"]: row for row in summary["tasks"] if row["status"] == "scored"}
    mains = {"wds/wilds/iwildcam": "F1-macro_all", "wds/wilds/camelyon17": "acc1", "wds/wilds/fmow": "acc_worst_region",
             "wds/dollar_street": "acc_top5_wg", "wds/geode": "acc_wg"}  # fmt: skip
    assert {k: r["main_metric"] for k, r in rows.items()} == mains
    values = []
    for dataset, metric in mains.items():
        result = json.loads(next(out.glob(f"{dataset[4:].replace('/', '_')}_*.json")).read_text())
        values.append(result["metrics"][metric])
        assert rows[dataset]["value"] == pytest.approx(result["metrics"][metric])
    assert summary["average"] == pytest.approx(sum(values) / 5)


def test_missing_metadata_leaves_datacomp_metrics_out(datacomp_root, model_file, tmp_path):
    """A sample without its npy row: accuracies are still scored; DataComp's metrics are left out and
    the sample counted (missing_metadata)."""
    from vlp.eval import benchmark_wds

    folder = tmp_path / "wds_geode"
    (folder / "test").mkdir(parents=True)
    source = datacomp_root / "wds_geode_test"
    for f in ("classnames.txt", "zeroshot_classification_templates.txt", "test/nshards.txt", "test/1.tar"):
        (folder / f).write_bytes((source / f).read_bytes())
    with tarfile.open(source / "test" / "0.tar") as src, tarfile.open(folder / "test" / "0.tar", "w") as dst:
        for member in src:
            if member.name != "s0000000.npy":
                dst.addfile(member, src.extractfile(member))
    root = str(tmp_path / "wds_{dataset}")
    data = benchmark_wds.load(benchmark_wds.locate("wds/geode", root), "zeroshot_classification")
    assert data.group_metrics == "geode" and data.group_metadata[0] is None
    assert data.group_metadata[1].tolist() == [1, 1]
    out = tmp_path / "out.json"
    run_main("eval", "--dataset", "wds/geode", "--dataset_root", root, "--model", "debug", "--checkpoint", model_file,
             "--output", str(out), "--workers", "0")  # fmt: skip
    result = json.loads(out.read_text())
    assert result["skipped"] == {"missing_metadata": 1} and "acc1" in result["metrics"]
    assert "acc_wg" not in result["metrics"]
