"""zeroshot_classification: each image's class is the class name whose prompts score highest.

Legend: N images, C classes, D feature dim.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from vlp.eval.datasets import EvalData, PathSpec, load_classification, load_templates
from vlp.eval.registry import EvalContext, EvalTask, encode_images, register
from vlp.eval.zeroshot import build_classifier, zeroshot_classify

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
    """acc1, acc5, mean_per_class_recall with CLIP_benchmark's definitions; prompts from
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
    labels = torch.as_tensor(data.labels)[kept]
    return zeroshot_classify(feats_ND[kept], classifier_DC.cpu().float(), labels)


TASK = register(
    EvalTask(
        "zeroshot_classification",
        load=load_zeroshot_classification,
        run=run_zeroshot_classification,
        options=("classnames", "templates"),
    )
)
