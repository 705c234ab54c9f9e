"""WinoGAViL (vlp/eval/winogavil.py, tasks/winogavil.py): DataComp's Hugging Face
`datasets` cache of nlphuji/winogavil, written here as `datasets` writes it (an Arrow IPC stream under
hf_cache/nlphuji___winogavil/TEST/1.1.0/<hash>/, the images under hf_cache/downloads/extracted/), scored
by `vlp eval` and checked against Jaccard values worked out by hand.

The model is a stub: an image's feature is the one-hot vector of its colour (the preprocess keeps the
top-left pixel; the nearest of 12 colours, JPEG being lossy), a prompt's the vector of scores given to
the 12 colours for its cue, so the similarity of a candidate to a cue is that score over the vector's
norm and every ranking is known. The prompt must be DataComp's ("An apple" for the cue "Apple").
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import run_main
from vlp.distributed import DistEnv
from vlp.eval.benchmark_wds import DatasetMissing
from vlp.eval.registry import EvalContext, get_task
from vlp.eval.winogavil import clip_prompt, load_winogavil, winogavil_metrics

COLOURS = [(r, g, b) for r in (0, 255) for g in (0, 128, 255) for b in (0, 255)]  # 12, far apart
HASH = "0f3c1e5d2b"  # stands for the sha256 folder names `datasets` gives downloads and builds
MOVED = "/datacomp-data-elsewhere/hf_cache"  # the cache where rows 3-5's paths say it was

# cue -> (candidate colours, associated colours, the colours the cue's scores rank first, in order)
EXAMPLES = [
    ("Apple", range(5), {0, 1}, [0, 2, 1, 3, 4]),  # picks 0, 2: J = 1/3
    ("moon", range(6), {3, 4, 5}, [3, 4, 5, 0, 1, 2]),  # picks 3, 4, 5: J = 1
    ("Umbrella", range(10), {0, 1, 2, 3}, [9, 8, 0, 1]),  # picks 9, 8, 0, 1: J = 2/6
    ("werewolf", range(12), {5, 6}, [7, 8]),  # picks 7, 8: J = 0
    ("Beard", range(12), {0, 1, 2}, [0, 1, 11]),  # picks 0, 1, 11: J = 2/4
    ("ocean", range(7, 12), {7}, [7]),  # picks 7: J = 1
]
EXPECTED = {
    "avg_jaccard_score": (1 / 3 + 1 + 1 / 3 + 0 + 1 / 2 + 1) / 6,
    "jaccard_score_5": (1 / 3 + 1) / 2,
    "jaccard_score_6": 1.0,
    "jaccard_score_10": 1 / 3,
    "jaccard_score_12": (0 + 1 / 2) / 2,
    "jaccard_score_5-6": (1 / 3 + 1 + 1) / 3,
    "jaccard_score_10-12": (1 / 3 + 0 + 1 / 2) / 3,
    "num_samples": 6,
}


def cue_scores(ranked: list[int]) -> torch.Tensor:
    """A score per colour: the ranked colours first (12, 11, ...), the others 1 (below all of them)."""
    scores = torch.ones(len(COLOURS))
    for place, colour in enumerate(ranked):
        scores[colour] = len(COLOURS) - place
    return scores


class StubModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.visual = torch.nn.Module()
        self.visual.preprocess_cfg = {}  # for the start-up line of `vlp eval`
        self.prompts = [clip_prompt(cue) for cue, *_ in EXAMPLES]
        self.text_table = torch.stack([cue_scores(ranked) for *_, ranked in EXAMPLES])
        self.colours = torch.tensor(COLOURS, dtype=torch.float32)

    def encode_image(self, pixels_B3):
        nearest = torch.cdist(pixels_B3.float(), self.colours).argmin(dim=1)
        return torch.nn.functional.one_hot(nearest, len(COLOURS)).float()

    def encode_text(self, tokens_B):
        return self.text_table[tokens_B]

    def tokenize(self, texts):
        return torch.tensor([self.prompts.index(t) for t in texts])  # a prompt not DataComp's fails here


def top_left_pixel(image: Image.Image) -> torch.Tensor:
    return torch.tensor(image.getpixel((0, 0)), dtype=torch.float32)


# ---- an Arrow IPC stream as `datasets` writes it (the format spec's flatbuffers, built front to back) ----


def write_arrow_stream(path: Path, rows: list[dict], batch_rows: int = 4) -> None:
    """``rows`` as `datasets`' ArrowWriter writes them (pyarrow's stream format): the schema with its
    ``huggingface`` features metadata, a record batch per ``batch_rows`` rows."""
    import pyarrow as pa

    image = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    features = {"cue": {"dtype": "string", "_type": "Value"}, "candidate_images": [{"_type": "Image"}]}
    schema = pa.schema(
        [("cue", pa.string()), ("candidates", pa.list_(pa.string())), ("associations", pa.list_(pa.string())),
         ("candidate_images", pa.list_(image)), ("ID", pa.int64())],
        metadata={"huggingface": json.dumps({"info": {"features": features}})},
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
        for start in range(0, len(rows), batch_rows):
            writer.write_batch(pa.RecordBatch.from_pylist(rows[start : start + batch_rows], schema=schema))


@pytest.fixture(scope="module")
def datacomp_data(tmp_path_factory) -> Path:
    """DataComp's data folder holding only hf_cache/ with WinoGAViL: the six examples above and a
    seventh whose images are not there. Rows 0-2 name their images where they are; rows 3-5 where
    the cache was before it moved (found from its downloads/ part on)."""
    data = tmp_path_factory.mktemp("datacomp")
    cache = data / "hf_cache"
    images = cache / "downloads" / "extracted" / HASH / "winogavil_images"
    images.mkdir(parents=True)
    for c, rgb in enumerate(COLOURS):
        Image.new("RGB", (16, 16), rgb).save(images / f"img{c}.jpg", quality=95)
    rows = []
    for i, (cue, candidates, associated, _) in enumerate(EXAMPLES):
        where = images if i < 3 else Path(MOVED) / images.relative_to(cache)
        names = [f"img{c}" for c in candidates]
        files = [{"bytes": None, "path": str(where / f"{n}.jpg")} for n in names]
        rows.append({"cue": cue, "candidates": names, "associations": [f"img{c}" for c in sorted(associated)],
                     "candidate_images": files, "ID": i})  # fmt: skip
    lost = [f"lost{k}" for k in range(5)]
    rows.append({"cue": "ghost", "candidates": lost, "associations": lost[:2], "ID": 6,
                 "candidate_images": [{"bytes": None, "path": str(images / f"{n}.jpg")} for n in lost]})  # fmt: skip
    write_arrow_stream(cache / "nlphuji___winogavil" / "TEST" / "1.1.0" / HASH / "winogavil-test.arrow", rows)
    return data


# ---- the metric and the prompt by hand --------------------------------------------------------


def test_metrics_hand_computed():
    scores = [[0.9, 0.1, 0.5, 0.2, 0.0], [0.0, 0.3, 0.2, 0.1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4]]
    truth = [[1, 1, 0, 0, 0], [1, 1, 0, 0, 1, 0, 0, 0, 0, 0]]
    # example 0 picks 0, 2 (J = 1/3); example 1 picks 4, 5, 6 (TP 1, FP 2, FN 2: J = 1/5)
    m = winogavil_metrics(scores, truth)
    assert m["jaccard_score_5"] == pytest.approx(1 / 3) and m["jaccard_score_10"] == pytest.approx(1 / 5)
    assert m["avg_jaccard_score"] == pytest.approx((1 / 3 + 1 / 5) / 2) and m["num_samples"] == 2
    assert m["jaccard_score_10-12"] == pytest.approx(1 / 5) and np.isnan(m["jaccard_score_12"])
    assert clip_prompt("Apple") == "An apple" and clip_prompt("pogonophile") == "A pogonophile"
    assert clip_prompt("UFO") == "An ufo" and clip_prompt("Yacht") == "A yacht"


def test_metrics_equal_datacomps_computation():
    """Random examples scored as DataComp's wino_eval.py scores them (top-n by numpy's argsort, the
    truth by np.isin, sklearn's jaccard_score, means per group) and by winogavil_metrics."""
    sklearn = pytest.importorskip("sklearn.metrics")
    g = np.random.default_rng(0)
    scores, truth, reference, sizes = [], [], [], []
    for _ in range(40):
        n = int(g.choice([5, 6, 10, 12]))
        names = [f"c{i}" for i in range(n)]
        chosen = list(g.choice(names, size=int(g.integers(1, n // 2 + 1)), replace=False))
        y_true = np.isin(names, chosen)
        logits = g.random(n).astype(np.float32)
        y_pred = np.isin(np.arange(n), np.argsort(logits)[-y_true.sum() :])
        scores.append(logits), truth.append(y_true), sizes.append(n)
        reference.append(sklearn.jaccard_score(y_true, y_pred))
    reference, sizes = np.array(reference), np.array(sizes)
    m = winogavil_metrics(scores, truth)
    assert m["avg_jaccard_score"] == pytest.approx(reference.mean())
    for key, mask in (("5", sizes == 5), ("12", sizes == 12), ("5-6", sizes <= 6), ("10-12", sizes >= 10)):
        assert m[f"jaccard_score_{key}"] == pytest.approx(reference[mask].mean())


# ---- the data as DataComp leaves it, scored by vlp eval ---------------------------------------


def test_every_layout_finds_the_cache(datacomp_data):
    cache = datacomp_data / "hf_cache"
    build = cache / "nlphuji___winogavil" / "TEST" / "1.1.0" / HASH
    for path in (datacomp_data, cache, cache / "nlphuji___winogavil", build, build / "winogavil-test.arrow"):
        data = load_winogavil(path)
        assert data.cues == [cue for cue, *_ in EXAMPLES], path
        assert data.skipped == {"missing_image": 1}
    assert len(data.images) == 12  # the distinct images, each encoded once
    assert data.associated[0] == [True, True, False, False, False]
    assert all(Path(p).is_relative_to(cache) for p in data.images)  # rows 3-5 found in the moved cache
    with pytest.raises(DatasetMissing, match="winogavil-test"):
        load_winogavil(datacomp_data / "elsewhere")
    with pytest.raises(DatasetMissing, match="winogavil-validation"):
        load_winogavil(datacomp_data, split="validation")


def test_python_api_scores_hand_computed(datacomp_data):
    model = StubModel()
    ctx = EvalContext(env=DistEnv(), preprocess=top_left_pixel, batch_size=5)
    metrics = get_task("winogavil").run(model, model.tokenize, load_winogavil(datacomp_data), ctx)
    assert metrics == pytest.approx(EXPECTED)


def test_datacomp_suite_scores_winogavil(datacomp_data, tmp_path, monkeypatch):
    """`vlp eval --suite datacomp` with DataComp's --dataset_root template: WinoGAViL is found in the
    data folder's hf_cache/, scored with DataComp's keys, and the average is its main metric."""
    model = StubModel()
    monkeypatch.setattr("vlp.api.load_model", lambda *a, **kw: (model, top_left_pixel, model.tokenize))
    out = tmp_path / "suite"
    proc = run_main("eval", "--model", "debug", "--suite", "datacomp", "--output", f"{out}/", "--workers", "0",
                    "--dataset_root", str(datacomp_data / "wds_{dataset_cleaned}_test"), "--device", "cpu",
                    "--batch-size", "5")  # fmt: skip
    assert "over 1 of 38 tasks" in proc.stdout and "not scored" not in proc.stdout
    result = json.loads((out / "misc_winogavil__debug_en_winogavil.json").read_text())
    assert result["dataset"] == "wds/misc/winogavil" and result["task"] == "winogavil"
    assert result["metrics"] == pytest.approx(EXPECTED) and result["skipped"] == {"missing_image": 1}
    summary = json.loads((out / "datacomp_summary.json").read_text())
    row = next(r for r in summary["tasks"] if r["name"] == "WinoGAViL")
    assert row["status"] == "scored" and row["main_metric"] == "jaccard_score_10-12"
    assert summary["average"] == pytest.approx(EXPECTED["jaccard_score_10-12"]) and summary["tasks_scored"] == 1


def test_dataset_and_task_options_read_the_cache(datacomp_data, tmp_path, monkeypatch):
    """`vlp eval --dataset wds/misc/winogavil --dataset_root DATA` (which picks the winogavil task
    itself) and `vlp eval --task winogavil --data DATA`."""
    model = StubModel()
    monkeypatch.setattr("vlp.api.load_model", lambda *a, **kw: (model, top_left_pixel, model.tokenize))
    for name, where in (("one.json", ["--dataset", "wds/misc/winogavil", "--dataset_root"]),
                        ("two.json", ["--task", "winogavil", "--data"])):  # fmt: skip
        run_main("eval", "--model", "debug", *where, datacomp_data, "--output", tmp_path / name,
                 "--workers", "0", "--device", "cpu")  # fmt: skip
        result = json.loads((tmp_path / name).read_text())
        assert result["task"] == "winogavil" and result["metrics"] == pytest.approx(EXPECTED), name
    proc = run_main("eval", "--model", "debug", "--dataset", "wds/misc/winogavil", "--task", "zeroshot_retrieval",
                    "--dataset_root", datacomp_data, "--output", tmp_path / "three.json", check=False)  # fmt: skip
    assert proc.returncode != 0 and "read by the task winogavil only" in proc.stderr
