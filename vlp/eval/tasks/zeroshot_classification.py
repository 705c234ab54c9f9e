"""zeroshot_classification: each image's class is the class name whose prompts score highest.
A multilabel set (``EvalData.multilabels``) is scored by mean average precision instead; a set with
DataComp's metadata (``EvalData.group_metrics``) gets DataComp's metrics too.

Legend: N images, C classes, D feature dim, M metadata fields.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
import torch

from vlp.eval.datacomp_metrics import MetadataError, datacomp_metrics
from vlp.eval.datasets import EvalData, EvalDataError, PathSpec, load_classification, load_templates
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register
from vlp.eval.zeroshot import build_classifier, multilabel_classify, zeroshot_classify

DEFAULT_TEMPLATES = "imagenet-simple"  # when neither --templates nor the data give any: ImageNet's 7


def load_zeroshot_classification(
    path: PathSpec,
    classnames: str | os.PathLike | Sequence[str] | None = None,
    templates: str | os.PathLike | Sequence | None = None,
) -> EvalData:
    """:func:`~vlp.eval.datasets.load_classification`'s layouts with ``classnames`` (a file, a list or
    ``"imagenet"``); ``templates`` (see :func:`~vlp.eval.datasets.load_templates`), when given,
    replace those found beside the data. Raises EvalDataError as those two do."""
    data = load_classification(path, classnames=classnames)
    if templates:
        data.templates = load_templates(templates)
    return data


def run_zeroshot_classification(model, tokenizer, data: EvalData, ctx: EvalContext) -> dict:
    """acc1, acc5, mean_per_class_recall with CLIP_benchmark's definitions (a multilabel set:
    mean_average_precision), plus DataComp's metrics where the data name them; prompts from
    ``data.templates``, else ImageNet's 7 short ones."""
    feats_ND, kept = encode_images(model, data, ctx)
    classifier_DC = build_classifier(
        model.encode_text,
        tokenizer,
        data.classnames,
        load_templates(data.templates or DEFAULT_TEMPLATES),
        device=ctx.env.device,
        batch_size=ctx.batch_size,
    )
    classifier_DC = classifier_DC.cpu().float()
    if data.multilabels is not None:
        targets_NC = torch.from_numpy(np.stack([data.multilabels[i] for i in kept]))
        return multilabel_classify(feats_ND[kept], classifier_DC, targets_NC)
    labels_N = torch.as_tensor(data.labels)[kept]
    metrics = zeroshot_classify(feats_ND[kept], classifier_DC, labels_N)
    if data.group_metrics:
        metrics.update(_datacomp(data, 100.0 * (feats_ND[kept] @ classifier_DC), labels_N, kept))
    return metrics


def _datacomp(data: EvalData, logits_NC: torch.Tensor, labels_N: torch.Tensor, kept: list[int]) -> dict:
    """DataComp's metrics of ``data.group_metrics``; none (and ``missing_metadata`` counted) when a
    sample scored has no metadata row. EvalDataError for rows that cannot be grouped."""
    metadata_NM = None
    if data.group_metadata is not None:
        rows = [data.group_metadata[i] for i in kept]
        missing = sum(row is None for row in rows)
        if missing:
            data.skipped["missing_metadata"] = data.skipped.get("missing_metadata", 0) + missing
            return {}
        if len({len(row) for row in rows}) > 1:
            raise EvalDataError(f"{data.name}: npy metadata rows of different lengths {sorted({len(r) for r in rows})}")
        metadata_NM = torch.from_numpy(np.stack(rows))
    try:
        return datacomp_metrics(data.group_metrics, logits_NC, labels_N, metadata_NM)
    except MetadataError as e:
        raise EvalDataError(f"{data.name}: {e}") from None


TASK = register(
    EvalTask(
        "zeroshot_classification",
        load=load_zeroshot_classification,
        run=run_zeroshot_classification,
        options=("classnames", "templates"),
    )
)
