"""linear_probe: logistic regression on the frozen image features of a train split, scored on a test
split with CLIP_benchmark's protocol (:mod:`vlp.eval.linear_probe`)."""

from __future__ import annotations

import os
from collections import Counter
from pathlib import Path

import torch

from vlp.distributed import all_gather_objects
from vlp.eval.datasets import EvalData, EvalDataError, PathSpec, load_classification
from vlp.eval.linear_probe import linear_probe
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register


def _split_source(folder: Path) -> PathSpec:
    """The ``.tar`` shards directly in ``folder`` (sorted) if it has any, else the folder itself."""
    return sorted(str(p) for p in folder.glob("*.tar")) or folder


def load_linear_probe(path: str | os.PathLike) -> EvalData:
    """``path/train`` and ``path/test``, each a :func:`~vlp.eval.datasets.load_classification` layout
    (an ImageFolder, or a folder of ``.tar`` shards with ``_info.json``) -> the images of both (train
    first), labels, classnames and ``split`` ("train"/"test" per image); skip counts are summed.

    Raises EvalDataError: ``path`` or a split folder not found, class names that differ between
    the splits (in number or order), or as ``load_classification`` for either split.
    """
    root = Path(path)
    parts = {}
    for split in ("train", "test"):
        if not (root / split).is_dir():
            raise EvalDataError(f"{root / split}: not found (linear_probe data is a folder with train/ and test/)")
        parts[split] = load_classification(_split_source(root / split))
    train, test = parts["train"].classnames, parts["test"].classnames
    if train != test:
        if len(train) != len(test):
            problem = f"{len(train)} classes in train/ but {len(test)} in test/"
        else:
            c = next(c for c, (a, b) in enumerate(zip(train, test)) if a != b)
            problem = f"class {c} is {train[c]!r} in train/ but {test[c]!r} in test/"
        raise EvalDataError(f"{root}: the class names of train/ and test/ must agree: {problem}")
    return EvalData(
        images=[image for part in parts.values() for image in part.images],
        labels=[label for part in parts.values() for label in part.labels],
        classnames=train,
        split=[split for split, part in parts.items() for _ in part.images],
        skipped=dict(Counter(parts["train"].skipped) + Counter(parts["test"].skipped)),
        name=root.name,
    )


def run_linear_probe(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """Logistic regression on the frozen image features of the train split, scored on the test
    split with CLIP_benchmark's protocol (see :mod:`vlp.eval.linear_probe`). Raises EvalDataError
    when a split has no readable image."""
    feats_ND, kept = encode_images(model, data, ctx)
    split = {name: [i for i in kept if data.split[i] == name] for name in ("train", "test")}
    if not split["train"] or not split["test"]:
        raise EvalDataError(f"{data.name}: linear_probe needs readable train and test images; skipped: {data.skipped}")
    labels = torch.as_tensor(data.labels)
    train, test = (feats_ND[split[name]].to(ctx.env.device) for name in ("train", "test"))
    metrics = None
    if ctx.env.is_main:  # one rank fits and every rank reports its numbers: no float drift between ranks
        metrics = linear_probe(train, labels[split["train"]], test, labels[split["test"]], len(data.classnames))
    return all_gather_objects(metrics, ctx.env)[0]


TASK = register(EvalTask("linear_probe", load=load_linear_probe, run=run_linear_probe))
