"""Evaluation tasks by name. Each maps (model, tokenizer, EvalData, context) to a metrics dict.

Legend: N images, M texts, C classes, D feature dim.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp.distributed import all_gather_objects
from vlp.eval.extract import image_features, text_features
from vlp.eval.linear_probe import linear_probe
from vlp.eval.retrieval import retrieval_chance, retrieval_metrics
from vlp.eval.zeroshot import build_classifier, zeroshot_classify

log = logging.getLogger(__name__)


class UnknownTaskError(ValueError):
    pass


TASKS: dict[str, Callable] = {}
ALIASES = {"retrieval": "zeroshot_retrieval"}
COUNTS = tuple(range(2, 11))
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine", 10: "ten"}


@dataclass
class EvalContext:
    """What every task needs besides the data: where to run and how."""

    env: object
    preprocess: Callable
    batch_size: int = 256
    workers: int = 0
    templates: list = field(default_factory=list)
    plots_dir: Path | None = None
    image_policy: object = None  # vlp.data.images.ImagePolicy; None = its defaults


def register(name: str):
    def deco(fn):
        TASKS[name] = fn
        return fn

    return deco


def task_names() -> list[str]:
    return sorted(TASKS) + sorted(ALIASES)


def get_task(name: str) -> Callable:
    name = ALIASES.get(name, name)
    if name not in TASKS:
        raise UnknownTaskError(f"unknown eval task '{name}'; choose from {', '.join(task_names())}")
    return TASKS[name]


def _images(model, data, ctx):
    feats, kept, skipped = image_features(
        model,
        data.images,
        ctx.preprocess,
        ctx.env,
        batch_size=ctx.batch_size,
        workers=ctx.workers,
        policy=ctx.image_policy,
    )
    for kind, n in skipped.items():
        data.skipped[kind] = data.skipped.get(kind, 0) + n
    return feats, kept


@register("captioning")
def captioning(model, tokenizer, data, ctx: EvalContext) -> dict:
    """Beam-search captions (CoCa models only) scored with COCO's corpus BLEU-4 and CIDEr-D."""
    from vlp.eval.captioning import evaluate_captioning

    return evaluate_captioning(
        model,
        tokenizer,
        data,
        ctx.preprocess,
        ctx.env,
        batch_size=ctx.batch_size,
        workers=ctx.workers,
        policy=ctx.image_policy,
    )


@register("zeroshot_classification")
def zeroshot_classification(model, tokenizer, data, ctx: EvalContext) -> dict:
    """acc1, acc5, mean_per_class_recall with CLIP_benchmark's definitions."""
    feats, kept = _images(model, data, ctx)
    classifier = build_classifier(
        model.encode_text,
        tokenizer,
        data.classnames,
        ctx.templates,
        device=ctx.env.device,
        batch_size=ctx.batch_size,
    )
    labels = torch.as_tensor(data.labels)[kept]
    return zeroshot_classify(feats[kept], classifier.cpu().float(), labels)


@register("zeroshot_retrieval")
def zeroshot_retrieval(model, tokenizer, data, ctx: EvalContext) -> dict:
    """Recall@1/5/10 both ways (CLIP_benchmark definitions) and mean ranks."""
    feats, kept = _images(model, data, ctx)
    keep = set(kept)
    t2i = torch.as_tensor(data.text_to_image)
    texts = [i for i, img in enumerate(data.text_to_image) if img in keep]
    remap = {old: new for new, old in enumerate(kept)}
    txt = text_features(model, tokenizer, [data.captions[i] for i in texts], ctx.env, batch_size=ctx.batch_size)
    t2i = torch.as_tensor([remap[int(t2i[i])] for i in texts])
    out = retrieval_metrics(feats[kept], txt, t2i)
    for k in (1, 5, 10):
        chance = retrieval_chance(len(kept), len(texts), k)
        out.update({f"chance_{key}": v for key, v in chance.items()})
    return out


@register("compositional")
def compositional(model, tokenizer, data, ctx: EvalContext) -> dict:
    """Accuracy that the positive caption scores above every negative, overall and per type."""
    feats, kept = _images(model, data, ctx)
    texts, owner = [], []
    for i in kept:
        texts += [data.positives[i], *data.negatives[i]]
        owner += [i] * (1 + len(data.negatives[i]))
    txt = text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size)
    pos = 0
    correct, by_type = {}, {}
    for i in kept:
        n = 1 + len(data.negatives[i])
        scores = txt[pos : pos + n] @ feats[i]
        pos += n
        correct[i] = bool((scores[0] > scores[1:]).all())
        kind = (data.types[i] if data.types else None) or "all"
        by_type.setdefault(kind, []).append(correct[i])
    out = {"acc": sum(correct.values()) / max(1, len(correct)), "num_samples": len(correct)}
    for kind, hits in sorted(by_type.items()):
        out[f"acc_{kind}"] = sum(hits) / len(hits)
    out["chance"] = sum(1 / (1 + len(data.negatives[i])) for i in kept) / max(1, len(kept))
    return out


@register("linear_probe")
def linear_probe_task(model, tokenizer, data, ctx: EvalContext) -> dict:
    """Logistic regression on the frozen image features of the train split, scored on the test
    split with CLIP_benchmark's protocol (see :mod:`vlp.eval.linear_probe`)."""
    from vlp.eval.datasets import EvalDataError

    feats, kept = _images(model, data, ctx)
    split = {name: [i for i in kept if data.split[i] == name] for name in ("train", "test")}
    if not split["train"] or not split["test"]:
        raise EvalDataError(f"{data.name}: linear_probe needs readable train and test images; skipped: {data.skipped}")
    labels = torch.as_tensor(data.labels)
    train, test = (feats[split[name]].to(ctx.env.device) for name in ("train", "test"))
    metrics = None
    if ctx.env.is_main:  # one rank fits and every rank reports its numbers: no float drift between ranks
        metrics = linear_probe(train, labels[split["train"]], test, labels[split["test"]], len(data.classnames))
    return all_gather_objects(metrics, ctx.env)[0]


def count_captions(caption: str, count: int) -> list[str]:
    """The caption rewritten for every count in 2..10, keeping digits as digits and words as words."""
    from vlp.eval.datasets import find_number

    span = find_number(caption, count)
    if span is None:
        raise ValueError(f"caption has no number for count {count}: {caption!r}")
    start, end = span
    word = caption[start:end]
    out = []
    for n in COUNTS:
        new = str(n) if word.isdigit() else NUMBER_WORDS[n]
        if word[:1].isupper():
            new = new.capitalize()
        out.append(caption[:start] + new + caption[end:])
    return out


@register("counting")
def counting(model, tokenizer, data, ctx: EvalContext) -> dict:
    """Pick the count 2..10 whose caption scores highest: accuracy, MAE, confusion matrix."""
    feats, kept = _images(model, data, ctx)
    texts = [t for i in kept for t in count_captions(data.captions[i], data.counts[i])]
    txt = text_features(model, tokenizer, texts, ctx.env, batch_size=ctx.batch_size)
    scores = torch.einsum("ncd,nd->nc", txt.view(len(kept), len(COUNTS), -1), feats[kept])
    pred = torch.as_tensor(COUNTS)[scores.argmax(1)]
    true = torch.as_tensor([data.counts[i] for i in kept])
    confusion = torch.zeros(len(COUNTS), len(COUNTS), dtype=torch.long)
    for t, p in zip(true.tolist(), pred.tolist()):
        confusion[t - COUNTS[0], p - COUNTS[0]] += 1
    out = {
        "acc": (pred == true).double().mean().item(),
        "mae": (pred - true).abs().double().mean().item(),
        "num_samples": len(kept),
        "chance": 1 / len(COUNTS),
        "confusion_matrix": confusion.tolist(),
        "counts": list(COUNTS),
    }
    if ctx.plots_dir is not None and ctx.env.is_main:
        from vlp.eval.plots import plot_confusion

        out["confusion_png"] = str(plot_confusion(confusion, COUNTS, Path(ctx.plots_dir) / "counting_confusion.png"))
    return out
