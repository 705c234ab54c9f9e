"""A training step makes no host-device sync, checked on CPU.

A GPU would catch a sync with ``torch.cuda.set_sync_debug_mode("error")``; without one, every
Python-level way a step can wait for device values is intercepted instead: tensor-to-Python
conversions (``item``, ``bool``, ``float``, ``tolist``, ...), copies to the host, and ops whose
output size depends on the data (``nonzero``, boolean-mask indexing, ``unique``, ...). What runs
inside C++ (autograd, a kernel) cannot sync on its own, so this covers vlp's code and torch's
Python (optimizer, clipping, scheduler). The step runs once to warm up, then under the detector.

``train.max_bad_steps=0`` throughout: the non-finite guard's one sync per step is by design and
documented with that option. Left out: fp16 (the GradScaler reads its inf check), DeepSpeed (the
batch-shape check), the ITM head (its negative sampling checks its inputs).
"""

from __future__ import annotations

import traceback

import pytest
import torch
from torch.overrides import TorchFunctionMode

from vlp.config import load_config

B, K = 8, 2
SYNC_FUNCS = {
    "item", "tolist", "numpy", "cpu", "__bool__", "__float__", "__int__", "__index__", "__complex__",
    "is_nonzero", "equal", "allclose", "nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
    "repeat_interleave",
}  # fmt: skip
INDEXING = {"__getitem__", "__setitem__", "index_put", "index_put_"}


def _name(func) -> str:
    return getattr(func, "__name__", str(func))


def _bool_index(args) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, (tuple, list)) else (index,)
    return any(torch.is_tensor(i) and i.dtype == torch.bool for i in items)


class SyncDetector(TorchFunctionMode):
    """Records ``(op, file, line, function)`` of every call that would make the host wait for a device."""

    def __init__(self):
        super().__init__()
        self.found: list[tuple[str, str, int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = _name(func)
        syncs = name in SYNC_FUNCS or (name in INDEXING and _bool_index(args))
        if syncs and not (name == "repeat_interleave" and _known_size(args, kwargs or {})):
            frame = traceback.extract_stack()[-2]
            self.found.append((name, frame.filename, frame.lineno, frame.name))
        return func(*args, **(kwargs or {}))


def _known_size(args, kwargs) -> bool:
    """``repeat_interleave`` syncs only when the repeats are a tensor and no ``output_size`` is given."""
    repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
    return not torch.is_tensor(repeats) or kwargs.get("output_size") is not None


ALLOWED = (
    # vlp's CoCa forward cuts the decoder input at the batch's longest caption: reading that length
    # is one sync, which buys a vocabulary projection over L' positions instead of all 76
    ("vlp/models/coca.py", "forward"),
    # the all-padding check runs on CPU tensors only, where it costs nothing (see its docstring)
    ("vlp/losses/objective.py", "caption_loss"),
)


def _batch(model, extras: bool, seed: int) -> dict:
    from vlp.models.registry import context_length, image_size

    g = torch.Generator().manual_seed(seed)
    size, ctx = image_size(model), context_length(model)
    tokens = lambda *shape: torch.randint(1, 400, (*shape, ctx), generator=g)  # noqa: E731
    batch = {
        "image": torch.randint(0, 256, (B, 3, size, size), generator=g, dtype=torch.uint8),
        "text": tokens(B),
        "caption": [f"caption {i}" for i in range(B)],
    }
    if extras:
        batch.update(text_neg=tokens(B, K), text_cf=tokens(B), has_cf=torch.arange(B) % 2 == 0)
    return batch


CASES = {
    "clip gather": [],
    "tiled dcl bf16, 2 micro-batches": [
        "loss.contrastive.impl=tiled", "loss.contrastive.dcl=true", "loss.contrastive.tile_size=4",
        "model.precision=bf16", "train.accum_steps=2",
    ],
    "coca, patch dropout, checkpointing, 2 micro-batches": [
        "model.name=coca_debug", "model.patch_dropout=0.5", "model.grad_checkpointing=true", "train.accum_steps=2",
    ],
    "siglip": ["model.name=debug-siglip", "loss.contrastive.type=siglip"],
    "negatives, counterfactuals, momentum distillation": [
        "data.negatives.k=2", "data.counterfactuals=true", "loss.negatives.image_grounded_weight=1.0",
        "loss.negatives.text_grounded_weight=0.5", "loss.distill.enabled=true", "loss.distill.queue_size=32",
        "loss.distill.alpha_warmup_steps=0",
    ],
}  # fmt: skip


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_makes_no_host_sync(case, tmp_path, monkeypatch):
    from vlp.train import trainer as trainer_module

    # no tokenizer is needed (the batches hold tokens); open_clip's for *siglip* names is a download
    monkeypatch.setattr(trainer_module, "get_tokenizer", lambda model_cfg: None)

    overrides = [
        "train.device=cpu", "train.max_bad_steps=0", f"train.output_dir={tmp_path}", "eval.tasks=[]",
        "data.val_shards=[]", f"data.batch_size={B}", *CASES[case],
    ]  # fmt: skip
    trainer = trainer_module.Trainer(load_config(None, overrides))
    extras = "data.negatives.k=2" in overrides
    k = trainer.cfg.train.accum_steps
    trainer.train_step([_batch(trainer.model, extras, seed=i) for i in range(k)])
    detector = SyncDetector()
    with detector:
        loss = trainer.train_step([_batch(trainer.model, extras, seed=10 + i) for i in range(k)])[0]
    unexpected = [f for f in detector.found if not any(f[1].endswith(file) and f[3] == fn for file, fn in ALLOWED)]
    assert unexpected == []
    assert torch.isfinite(loss)  # the step ran for real


def test_detector_catches_the_usual_syncs():
    x = torch.randn(4)
    with SyncDetector() as d:
        float(x.sum()), bool(x[0] > 0), x.tolist(), x[x > 0], torch.nonzero(x)
    assert [found[0] for found in d.found] == ["__float__", "__bool__", "tolist", "__getitem__", "nonzero"]
