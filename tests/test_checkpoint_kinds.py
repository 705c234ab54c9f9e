"""vlp.checkpoint.resolve on every kind of checkpoint vlp reads, on a folder of no kind, and on a
crafted pickle (refused, its code never run)."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from vlp.checkpoint import KINDS, ArchitectureNeeded, CheckpointError, NotACheckpoint, resolve, training_state
from vlp.config import load_config
from vlp.models.registry import build_model


@pytest.fixture(scope="module")
def debug_model():
    torch.manual_seed(0)
    model, _, _ = build_model("debug")
    return model


def _vlp_file(path, model):
    cfg = load_config(None, ["model.name=debug"])
    torch.save(training_state(7, cfg.to_dict(), 1, model=model.state_dict()), path)
    return path


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_vlp_training_checkpoint(debug_model, tmp_path):
    found = resolve(_vlp_file(tmp_path / "step.pt", debug_model))
    assert found.kind == "vlp checkpoint" and found.model_cfg.name == "debug"
    assert found.checkpoint["step"] == 7 and _same(found.state_dict, debug_model.state_dict())


def test_a_safetensors_export(debug_model, tmp_path):
    from vlp.export import export_checkpoint

    export_checkpoint(_vlp_file(tmp_path / "step.pt", debug_model), "safetensors", tmp_path / "st")
    found = resolve(tmp_path / "st" / "model.safetensors")
    assert found.kind == "vlp safetensors export" and found.model_cfg.name == "debug" and found.checkpoint is None
    assert _same(found.state_dict, debug_model.state_dict())


def test_an_open_clip_file_needs_its_architecture(debug_model, tmp_path):
    path = tmp_path / "open_clip.pt"
    torch.save({"state_dict": {f"module.{k}": v for k, v in debug_model.state_dict().items()}}, path)
    with pytest.raises(ArchitectureNeeded, match="pass model_name.*tried: " + ", ".join(KINDS[:4])):
        resolve(path)
    found = resolve(path, "debug")
    assert found.kind == "open_clip checkpoint" and _same(found.state_dict, debug_model.state_dict())


def test_a_deepspeed_folder_dispatches_to_its_consolidation(debug_model, tmp_path, monkeypatch):
    """The dispatch; consolidating real ZeRO shards: tests/test_deepspeed.py."""
    from vlp.checkpoint import kinds

    folder = tmp_path / "checkpoints"
    folder.mkdir()
    saved = torch.load(_vlp_file(tmp_path / "step.pt", debug_model), weights_only=True)
    monkeypatch.setattr(kinds, "is_deepspeed_checkpoint", lambda path: path == folder)
    monkeypatch.setattr(kinds, "read_as_vlp_checkpoint", lambda path: saved)
    found = resolve(folder)
    assert found.kind == "vlp DeepSpeed checkpoint" and found.model_cfg.name == "debug"


def test_a_folder_of_no_kind_and_a_missing_path(tmp_path):
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(NotACheckpoint, match="folder but not a DeepSpeed checkpoint"):
        resolve(tmp_path)
    with pytest.raises(FileNotFoundError):
        resolve(tmp_path / "missing.pt")


class _Payload:
    """Unpickling this would create the marker file: the code a malicious checkpoint would run."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.makedirs, (self.marker,))


def test_a_crafted_pickle_is_refused_and_its_code_never_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": _Payload(str(marker))}, f, protocol=2)
    with pytest.raises(CheckpointError, match="refused"):
        resolve(path, "debug")
    assert not marker.exists()
