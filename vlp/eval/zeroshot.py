"""Zero-shot classification: prompt-ensemble classifier and accuracy metrics.

Definitions follow LAION's CLIP_benchmark 1.6.x (``clip_benchmark/metrics/zeroshot_classification.py``):

* classifier: per class, L2-normalise each template's text embedding, average over templates,
  renormalise; the class vectors are the columns of ``W_DC``.
* ``acc{k}``: fraction of samples whose label is among the k highest logits (their ``accuracy``,
  built on ``torch.topk``). CLIP_benchmark reports ``acc5 = nan`` when the dataset has fewer than
  5 classes instead of calling ``topk`` with k > C (which would raise); here any k > C gives nan.
* ``mean_per_class_recall``: sklearn's ``balanced_accuracy_score(labels, argmax(logits))``, i.e.
  the recall of the top-1 prediction per class, averaged over the classes present in ``labels``.
* multilabel sets (a 0/1 vector of C per image): ``mean_average_precision``, the mean over all C
  classes of their ``average_precision_per_class`` (a class without positives counts as 0).

Tie rule. ``torch.topk`` documents no order among equal values, and in practice returns an
arbitrary subset of tied indices (the CPU kernel uses a non-stable partial sort / nth_element), so
CLIP_benchmark's ``acc{k}`` is not defined under ties. Their ``mean_per_class_recall`` uses
``argmax``, which is documented to return the first (lowest-index) maximum. We use that rule
everywhere: among equal scores the lower index ranks first (a stable descending sort). It agrees
with ``topk`` whenever no tie straddles the top-k boundary, and makes ``acc1`` consistent with
``mean_per_class_recall``.

Shape legend: N samples (images), C classes, D embedding dim, T templates, P prompts (C*T),
B prompts in one encoder batch, L token length.
"""

from __future__ import annotations

import re
import string
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

Template = str | Callable[[str], str]


def rank_of_target(scores_NC: Tensor, target_N: Tensor) -> Tensor:
    """1-based rank of ``scores_NC[n, target_N[n]]`` within row n, ties to the lower index.

    rank = 1 + #{c : s_c > s_t} + #{c < t : s_c == s_t}, i.e. the position of the target in a
    stable descending sort. "target in top-k" is then ``rank <= k``. Memory is O(N*C).

    Args:
        scores_NC: float scores, no NaN.
        target_N: integer column index per row, in [0, C).
    Returns:
        LongTensor[N] of ranks in [1, C].
    """
    target_N1 = target_N.to(scores_NC.device, torch.long).unsqueeze(1)
    target_score_N1 = scores_NC.gather(1, target_N1)
    column_1C = torch.arange(scores_NC.shape[1], device=scores_NC.device).unsqueeze(0)
    ahead_NC = (scores_NC > target_score_N1) | ((scores_NC == target_score_N1) & (column_1C < target_N1))
    return ahead_NC.sum(dim=1) + 1


def _check_template(template: Template) -> None:
    """Raise ValueError unless a string template has a ``{c}`` field and no other fields."""
    if callable(template):
        return
    if not isinstance(template, str):
        raise ValueError(f"template must be a str with '{{c}}' or a callable, got {type(template).__name__}")
    fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    roots = {re.split(r"[.\[]", name)[0] for name in fields}
    if "c" not in roots:
        raise ValueError(f"template {template!r} has no '{{c}}' placeholder for the class name")
    if roots != {"c"}:
        raise ValueError(f"template {template!r} has fields other than '{{c}}': {sorted(roots - {'c'})}")


def _render(template: Template, classname: str) -> str:
    """One prompt; string templates use ``str.format(c=classname)`` like CLIP_benchmark."""
    text = template(classname) if callable(template) else template.format(c=classname)
    if not isinstance(text, str):
        raise ValueError(f"template {template!r} returned {type(text).__name__}, expected str")
    return text


def build_prompts(classnames: Sequence[str], templates: Sequence[Template]) -> list[str]:
    """All C*T prompts, class-major (the T templates of class 0 first).

    Raises:
        ValueError: empty ``classnames`` or ``templates``, ``templates`` given as a single string,
            a string template without ``{c}`` (or with other fields), a callable not returning str.
    """
    if isinstance(templates, str):
        raise ValueError("templates must be a list of templates, not a single string")
    if len(classnames) == 0:
        raise ValueError("classnames is empty: need at least one class")
    if len(templates) == 0:
        raise ValueError("templates is empty: need at least one template")
    for template in templates:
        _check_template(template)
    return [_render(template, name) for name in classnames for template in templates]


def _encode_prompts(encode_text, tokenizer, prompts: list[str], device, batch_size: int) -> Tensor:
    """Encode prompts in batches; returns per-prompt L2-normalised float32 features [P, D]."""
    feats = []
    for start in range(0, len(prompts), batch_size):
        batch = prompts[start : start + batch_size]
        tokens_BL = tokenizer(batch).to(device)
        feats_BD = encode_text(tokens_BL)
        if feats_BD.ndim != 2 or feats_BD.shape[0] != len(batch):
            raise ValueError(f"encode_text returned shape {tuple(feats_BD.shape)} for {len(batch)} prompts")
        # normalise per template before averaging: templates weigh equally whatever their norm
        feats.append(F.normalize(feats_BD.float(), dim=-1))
    return torch.cat(feats)


@torch.no_grad()
def build_classifier(
    encode_text: Callable[[Tensor], Tensor],
    tokenizer: Callable[[list[str]], Tensor],
    classnames: list[str],
    templates: list[Template],
    *,
    device="cpu",
    batch_size: int = 256,
) -> Tensor:
    """Zero-shot classifier ``W_DC``: renormalised mean of normalised template embeddings.

    Args:
        encode_text: ``encode_text(token_ids_BL) -> features_BD`` (normalised or not).
        tokenizer: ``tokenizer(list[str]) -> LongTensor[B, L]``.
        classnames: C class names.
        templates: T templates, each a str formatted with ``.format(c=classname)`` or a callable
            ``classname -> str``.
        device: where tokens are sent (and the result lives).
        batch_size: prompts per ``encode_text`` call. Each class's prompts are encoded in their own
            calls, as CLIP_benchmark does: the same batch shapes give bit-identical features, which
            matters for an untrained model whose logits nearly tie.
    Returns:
        float32 Tensor[D, C] with unit-norm columns.
    Raises:
        ValueError: see :func:`build_prompts`; ``batch_size < 1``; ``encode_text`` output not [B, D].
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    prompts = build_prompts(classnames, templates)
    T = len(templates)
    per_class = [
        _encode_prompts(encode_text, tokenizer, prompts[c * T : (c + 1) * T], device, batch_size)
        for c in range(len(classnames))
    ]
    feats_CTD = torch.stack(per_class)
    class_CD = F.normalize(feats_CTD.mean(dim=1), dim=-1)
    return class_CD.T.contiguous()


def _check_logits(logits_NC: Tensor, labels_N: Tensor) -> None:
    """Raise ValueError on bad shapes, NaN logits or out-of-range labels."""
    if logits_NC.ndim != 2 or labels_N.ndim != 1 or logits_NC.shape[0] != labels_N.shape[0]:
        raise ValueError(
            f"expected logits [N, C] and labels [N], got {tuple(logits_NC.shape)} and {tuple(labels_N.shape)}"
        )
    if labels_N.numel() == 0:
        raise ValueError("no samples: logits and labels are empty")
    if labels_N.is_floating_point() or labels_N.is_complex():
        raise ValueError(f"labels must be integers, got {labels_N.dtype}")
    if torch.isnan(logits_NC).any():
        raise ValueError("logits contain NaN")
    num_classes = logits_NC.shape[1]
    if labels_N.min() < 0 or labels_N.max() >= num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels_N.min()}, {labels_N.max()}]")


def mean_per_class_recall(pred_N: Tensor, labels_N: Tensor, num_classes: int) -> float:
    """Balanced accuracy: per-class recall of ``pred_N``, averaged over classes present in labels.

    Matches ``sklearn.metrics.balanced_accuracy_score(labels, pred)`` (classes only predicted,
    never true, are left out, as sklearn drops their NaN rows).
    """
    labels_N = labels_N.to(pred_N.device, torch.long)
    support_C = torch.bincount(labels_N, minlength=num_classes)
    hits_C = torch.bincount(labels_N[pred_N == labels_N], minlength=num_classes)
    present_C = support_C > 0
    return (hits_C[present_C].double() / support_C[present_C].double()).mean().item()


@torch.no_grad()
def classification_metrics(logits_NC: Tensor, labels_N: Tensor, *, topk: Sequence[int] = (1, 5)) -> dict:
    """Top-k accuracies and mean per-class recall, as CLIP_benchmark reports them.

    Ties: among equal logits the lower class index ranks first (see module docstring); the top-1
    prediction is ``argmax`` (first maximum).

    Args:
        logits_NC: scores, any real dtype, no NaN.
        labels_N: integer labels in [0, C).
        topk: the k of each ``acc{k}`` key.
    Returns:
        ``{"acc{k}": float for k in topk, "mean_per_class_recall": float}``, values in [0, 1],
        except ``acc{k}`` is ``nan`` when k > C (CLIP_benchmark's rule for acc5 with < 5 classes).
    Raises:
        ValueError: bad shapes, no samples, NaN logits, labels out of range, k < 1.
    """
    _check_logits(logits_NC, labels_N)
    if any(k < 1 for k in topk):
        raise ValueError(f"topk values must be >= 1, got {tuple(topk)}")
    num_classes = logits_NC.shape[1]
    labels_N = labels_N.to(logits_NC.device, torch.long)
    rank_N = rank_of_target(logits_NC, labels_N)
    metrics = {}
    for k in topk:
        metrics[f"acc{k}"] = float("nan") if k > num_classes else (rank_N <= k).double().mean().item()
    pred_N = logits_NC.argmax(dim=1)
    metrics["mean_per_class_recall"] = mean_per_class_recall(pred_N, labels_N, num_classes)
    return metrics


@torch.no_grad()
def zeroshot_classify(
    image_features_ND: Tensor, classifier_DC: Tensor, labels_N: Tensor, *, logit_scale: float = 100.0
) -> dict:
    """Logits ``logit_scale * img @ W`` then :func:`classification_metrics` with topk (1, 5).

    ``image_features_ND`` is expected L2-normalised (CLIP_benchmark normalises it); it is not
    renormalised here, which cannot change the metrics: scaling a row keeps its ranking.

    Returns:
        ``acc1``, ``acc5`` (nan if C < 5), ``mean_per_class_recall``, plus ``num_samples`` (int),
        ``num_classes`` (int) and ``chance`` (= 1/C, the expected acc1 of a random guess).
    Raises:
        ValueError: feature dims differ, or as :func:`classification_metrics`.
    """
    if image_features_ND.ndim != 2 or classifier_DC.ndim != 2:
        raise ValueError("expected image features [N, D] and classifier [D, C]")
    if image_features_ND.shape[1] != classifier_DC.shape[0]:
        raise ValueError(f"feature dim {image_features_ND.shape[1]} != classifier dim {classifier_DC.shape[0]}")
    classifier_DC = classifier_DC.to(image_features_ND.device, image_features_ND.dtype)
    logits_NC = logit_scale * (image_features_ND @ classifier_DC)
    metrics = classification_metrics(logits_NC, labels_N, topk=(1, 5))
    num_classes = classifier_DC.shape[1]
    metrics.update(num_samples=int(logits_NC.shape[0]), num_classes=int(num_classes), chance=1.0 / num_classes)
    return metrics


@torch.no_grad()
def average_precision_per_class(scores_NC: Tensor, targets_NC: Tensor) -> Tensor:
    """Per class c: rank the N samples by ``scores_NC[:, c]`` (descending; ties: lower index first),
    then AP_c = sum over the ranks k of its positives of precision@k, divided by max(#positives, 1),
    CLIP_benchmark's definition (``average_precision_per_class``, from torchnet's meter). Targets are
    0/1 (a nonzero entry is a positive; precision counts the targets' values).

    Returns:
        float64 Tensor[C].
    Raises:
        ValueError: shapes differ or are not [N, C], no samples, NaN scores.
    """
    if scores_NC.ndim != 2 or scores_NC.shape != targets_NC.shape:
        shapes = f"{tuple(scores_NC.shape)} and {tuple(targets_NC.shape)}"
        raise ValueError(f"expected scores and targets [N, C], got {shapes}")
    if scores_NC.shape[0] == 0:
        raise ValueError("no samples: scores and targets are empty")
    if torch.isnan(scores_NC).any():
        raise ValueError("scores contain NaN")
    order_NC = torch.sort(scores_NC, dim=0, descending=True, stable=True).indices
    truth_NC = targets_NC.to(scores_NC.device).double().gather(0, order_NC)
    rank_N1 = torch.arange(1, truth_NC.shape[0] + 1, device=truth_NC.device, dtype=torch.float64).unsqueeze(1)
    precision_NC = truth_NC.cumsum(dim=0) / rank_N1
    hits_C = (precision_NC * (truth_NC != 0)).sum(dim=0)
    return (hits_C / truth_NC.sum(dim=0).clamp_min(1.0)).cpu()


@torch.no_grad()
def multilabel_classify(image_features_ND: Tensor, classifier_DC: Tensor, targets_NC: Tensor) -> dict:
    """CLIP_benchmark's multilabel zero-shot score: logits ``100 * normalize(img) @ W`` (normalised:
    AP ranks samples against each other, so a feature's length would count), then
    ``mean_average_precision`` (:func:`average_precision_per_class` averaged over the C classes),
    with ``num_samples`` and ``num_classes``."""
    feats_ND = F.normalize(image_features_ND.float(), dim=-1)
    logits_NC = 100.0 * (feats_ND @ classifier_DC.to(feats_ND.device, feats_ND.dtype))
    ap_C = average_precision_per_class(logits_NC, targets_NC)
    return {"mean_average_precision": ap_C.mean().item(), "num_samples": int(logits_NC.shape[0]),
            "num_classes": int(logits_NC.shape[1])}  # fmt: skip
