"""Checkpointer: atomic files, keep-last-N, the latest pointer, fallback past a corrupt file."""

from __future__ import annotations

import logging

import pytest
import torch

from vlp.checkpoint.writing import Checkpointer


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


def test_bit_flip_is_caught_by_the_checksum(tmp_path, caplog):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"w": torch.ones(1000)})
    path = ck.save(2, {"w": torch.full((1000,), 2.0)})
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit inside the tensor data: torch.load alone would not notice
    path.write_bytes(bytes(data))
    found, state = ck.load("latest")
    assert found.name == "step_00000001.pt" and float(state["w"][0]) == 1.0
    assert "checksum mismatch" in caplog.text


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    ck = Checkpointer(tmp_path, keep=3)
    ck.save(1, {"w": torch.ones(3)})

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError, match="No space"):
        ck.save(2, {"w": torch.zeros(3)})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest", "step_00000001.pt", "step_00000001.pt.sha256"]
    assert ck.load("latest")[0].name == "step_00000001.pt"


def test_unwritable_or_full_output_folder_fails_before_training(tmp_path):
    from vlp.train.run_folder import check_writable

    check_writable(tmp_path / "new", need_bytes=1)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(OSError, match="not writable.*train.output_dir"):
        check_writable(blocker / "sub")
    with pytest.raises(OSError, match="GiB free, but a checkpoint needs"):
        check_writable(tmp_path, need_bytes=2**62)
