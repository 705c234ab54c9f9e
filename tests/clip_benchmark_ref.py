"""CLIP_benchmark's own metrics as the reference for `vlp eval` results: zero-shot classification
on an ImageFolder and multi-caption retrieval on JSONL rows, with its evaluate() functions."""

from __future__ import annotations

import pytest
import torch
from PIL import Image


def assert_equals_clip_benchmark(ours: dict, model, preprocess, tokenizer, root, rows, templates, batch_size=6):
    """``ours`` (``{task: metrics}`` of vlp) equal CLIP_benchmark's for ``model`` on ``root/folder``
    (classification with ``templates``) and ``rows`` (retrieval), to 1e-6. The caller makes
    clip-benchmark 1.6.2's ``float()`` on a 1-element array numpy>=2.4-safe."""
    from clip_benchmark.metrics import zeroshot_classification as zc
    from clip_benchmark.metrics import zeroshot_retrieval as zr
    from torchvision.datasets import ImageFolder

    model.eval()
    folder = ImageFolder(str(root / "folder"), transform=preprocess)
    loader = torch.utils.data.DataLoader(folder, batch_size=batch_size)
    theirs = zc.evaluate(model, loader, tokenizer, folder.classes, templates, "cpu", amp=False)
    for k in ("acc1", "acc5", "mean_per_class_recall"):
        assert ours["zeroshot_classification"][k] == pytest.approx(theirs[k], abs=1e-6), k
    pairs = [(preprocess(Image.open(root / r["image"])), r["captions"]) for r in rows]
    ret_loader = torch.utils.data.DataLoader(
        pairs, batch_size=batch_size, collate_fn=lambda b: (torch.stack([x for x, _ in b]), [c for _, c in b])
    )
    theirs = zr.evaluate(model, ret_loader, tokenizer, "cpu", amp=False, recall_k_list=[1, 5, 10])
    for k, v in theirs.items():
        assert ours["zeroshot_retrieval"][k] == pytest.approx(v, abs=1e-6), k
