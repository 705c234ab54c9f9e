"""Eval tasks by name: each maps (model, tokenizer, features, settings) to a flat metrics dict."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

from vlp.eval.retrieval import paired_retrieval_metrics, retrieval_chance
from vlp.eval.zeroshot import build_classifier, zeroshot_classify

log = logging.getLogger(__name__)

TASKS: dict[str, Callable] = {}


def register(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco


def get_task(name: str) -> Callable:
    if name not in TASKS:
        raise ValueError(f"unknown eval task '{name}'; choose from {', '.join(sorted(TASKS))}")
    return TASKS[name]


@register("zeroshot_classification")
def zeroshot_task(model, tokenizer, feats, settings: dict, device) -> dict:
    """Samples whose metadata has an integer ``cls`` are classified among ``classnames``."""
    classnames, templates = settings.get("classnames"), settings.get("templates")
    idx = [i for i, m in enumerate(feats.meta) if isinstance(m.get("cls"), int)]
    if not classnames or not templates or not idx:
        # e.g. val shards made from a captions file: retrieval still runs, this task says why it did not
        log.warning(
            "zeroshot_classification skipped: it needs class names and templates (eval.classnames/eval.templates "
            "or the val shards' _info.json) and samples with an integer 'cls' label"
        )
        return {}
    labels = torch.tensor([feats.meta[i]["cls"] for i in idx])
    if int(labels.max()) >= len(classnames):
        raise ValueError(f"label {int(labels.max())} but only {len(classnames)} class names")
    classifier = build_classifier(model.encode_text, tokenizer, classnames, templates, device=device)
    return zeroshot_classify(feats.image_ND[idx], classifier.cpu().float(), labels)


@register("retrieval")
def retrieval_task(model, tokenizer, feats, settings: dict, device) -> dict:
    """Image<->text retrieval with each sample's own caption as its one positive."""
    out = paired_retrieval_metrics(feats.image_ND, feats.text_ND)
    n = feats.image_ND.shape[0]
    for k in (1, 5, 10):
        out.update({f"chance_{key}": v for key, v in retrieval_chance(n, n, k).items()})
    return out
