"""Checkpointer: atomic files, keep-last-N, the latest pointer, fallback past a corrupt file."""

from __future__ import annotations

import logging

import torch

from vlp.train.checkpoint import Checkpointer


def test_keep_last_n_and_latest_pointer(tmp_path):
    ck = Checkpointer(tmp_path, keep=2)
    for step in (10, 20, 30):
        ck.save(step, {"step": step, "w": torch.full((3,), float(step))})
    assert [p.name for p in ck.list()] == ["step_00000020.pt", "step_00000030.pt"]
    assert (tmp_path / "latest").read_text() == "step_00000030.pt"
    assert not list(tmp_path.glob("*.tmp"))
    path, state = ck.load("latest")
    assert path.name == "step_00000030.pt" and state["step"] == 30


def test_corrupt_latest_falls_back_to_previous(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep=3)
    for step in (1, 2):
        ck.save(step, {"step": step})
    newest = ck.path_for(2)
    newest.write_bytes(newest.read_bytes()[:20])  # e.g. a disk that lost the tail
    with caplog.at_level(logging.WARNING):
        path, state = ck.load("latest")
    assert state["step"] == 1 and path.name == "step_00000001.pt"
    assert "unreadable" in caplog.text


def test_leftover_temp_file_is_ignored(tmp_path):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(5, {"step": 5})
    (tmp_path / "step_00000009.pt.tmp").write_bytes(b"half written")  # killed mid-write
    assert ck.latest().name == "step_00000005.pt"
    assert ck.load("latest")[1]["step"] == 5


def test_disabled_rank_writes_nothing(tmp_path):
    Checkpointer(tmp_path / "x", enabled=False).save(1, {"step": 1})
    assert not (tmp_path / "x").exists()
