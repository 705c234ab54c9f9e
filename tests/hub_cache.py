"""A Hugging Face hub cache made in the tests: the layout huggingface_hub itself reads offline
(``models--ORG--NAME/refs/main`` holding a revision, ``snapshots/REV/FILE`` linking to
``blobs/``), filled with random weights under the repo ids and file names open_clip's pretrained
tags resolve to. Nothing is downloaded; ``use_cache`` points huggingface_hub at it, offline."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

REVISION = "0123456789abcdef0123456789abcdef01234567"


def add_file(cache: Path, repo: str, filename: str, data: bytes) -> Path:
    """Put ``data`` in ``cache`` as ``repo``'s ``filename`` at :data:`REVISION` (a blob + a link)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    blob = folder / "blobs" / hashlib.sha256(data).hexdigest()
    blob.parent.mkdir(parents=True, exist_ok=True)
    if not blob.exists():
        blob.write_bytes(data)
    (folder / "refs").mkdir(exist_ok=True)
    (folder / "refs" / "main").write_text(REVISION)
    link = folder / "snapshots" / REVISION / filename
    link.parent.mkdir(parents=True, exist_ok=True)
    if not link.exists():
        link.symlink_to(os.path.relpath(blob, link.parent))
    return link


def safetensors_bytes(state_dict: dict[str, torch.Tensor], dtype=torch.float16) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to(dtype).contiguous() for k, v in state_dict.items()})


def add_open_clip_repo(cache: Path, repo: str, model_cfg: dict, state_dict: dict, preprocess_cfg: dict) -> None:
    """An open_clip hub repo (``hf-hub:`` id): ``open_clip_config.json`` + ``open_clip_model.safetensors``."""
    config = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg}
    add_file(cache, repo, "open_clip_config.json", json.dumps(config).encode())
    add_file(cache, repo, "open_clip_model.safetensors", safetensors_bytes(state_dict, torch.float32))


def use_cache(monkeypatch, cache: Path) -> None:
    """huggingface_hub reads its environment at import: set both the constants and the environment
    (for subprocesses)."""
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
