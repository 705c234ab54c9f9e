"""DataComp's own metrics for the classification tasks it does not score by accuracy alone
(mlfoundations/datacomp ``eval_utils/wilds_eval.py`` and ``fairness_eval.py``, which use the WILDS
package's metrics and groupers), computed from the logits, the labels and each sample's metadata.

DataComp's WebDataset copies of these sets carry, per sample, the label (``cls``) and a row of
integer metadata (``npy``); the columns are WILDS' ``metadata_fields`` for the dataset, in order:

====================  ==============================================  ======================
evaluator             metadata row (npy)                               DataComp main metric
====================  ==============================================  ======================
wilds/iwildcam        location, sequence, year, month, day, hour,      ``F1-macro_all``
                      minute, second, y (unused: F1 needs the labels)
wilds/camelyon17      hospital, slide, y                               ``acc1``
wilds/fmow            region, year, y                                  ``acc_worst_region``
dollar_street         income_ds, income_meta, region                   ``acc_top5_wg``
geode                 region, country                                  ``acc_wg``
====================  ==============================================  ======================

Definitions (the keys are DataComp's):

* ``acc_avg``: top-1 accuracy (argmax of the logits; ties to the lower class index).
* grouped accuracy by a field f (WILDS' ``CombinatorialGrouper`` on one field): the groups are
  0 … max(f) over the set; ``acc_f:g`` is the accuracy of group g (nan when it has no sample) and
  ``count_f:g`` its size; the worst-group accuracy is the least over the groups with samples.
* ``F1-macro_all`` / ``recall-macro_all``: sklearn's macro F1 / recall over the classes present in
  the labels (``labels=unique(y_true)``): F1_c = 2·TP / (2·TP + FP + FN).
* ``acc_top5_*``: the label among the 5 highest logits (ties to the lower index).

Per evaluator: iWildCam ``acc_avg``, ``recall-macro_all``, ``F1-macro_all``; Camelyon17
``acc_avg``, by ``slide``, ``acc_wg``; FMoW ``acc_avg``, by ``year`` with ``acc_worst_year``, by
``region`` with ``acc_worst_region``; Dollar Street ``acc_top5_avg``, by ``income_ds``,
``acc_top5_wg``; GeoDE ``acc_avg``, by ``region``, ``acc_wg``. DataComp's FMoW code leaves out a
region named "Other"; its evaluator has no names for the region numbers, so none is left out, nor here.

Legend: N samples, C classes, M metadata fields, G groups.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from vlp.eval.zeroshot import rank_of_target


class MetadataError(ValueError):
    """Metadata that cannot be grouped (too few columns, a negative value)."""


@dataclass(frozen=True)
class Evaluator:
    """One DataComp evaluator: its metadata fields (the columns of a sample's npy row) and
    ``score(logits_NC, labels_N, metadata_NM, fields) -> dict``."""

    fields: tuple[str, ...]
    score: Callable[[Tensor, Tensor, Tensor | None, tuple[str, ...]], dict]
    needs_metadata: bool = True


def group_accuracy(correct_N: Tensor, group_N: Tensor, n_groups: int) -> tuple[Tensor, Tensor]:
    """``(accuracy_G, count_G)``: the mean of ``correct_N`` (0/1) over each group 0 … G-1, float64;
    nan for a group without samples (DataComp's own average over groups is sum / count)."""
    group_N = group_N.long()
    count_G = torch.bincount(group_N, minlength=n_groups).double()
    hits_G = torch.bincount(group_N, weights=correct_N.double(), minlength=n_groups)
    return hits_G / count_G, count_G


def worst_group(accuracy_G: Tensor, count_G: Tensor) -> float:
    """The least accuracy over the groups with samples (0.0 when none has any, WILDS' empty value)."""
    present = accuracy_G[count_G > 0]
    return present.min().item() if present.numel() else 0.0


def grouped(
    name: str, correct_N: Tensor, metadata_NM: Tensor, fields: tuple[str, ...], field: str
) -> tuple[dict, float]:
    """``({name}_{field}:{g}: accuracy, count_{field}:{g}: size for every g}, worst-group accuracy)``
    with groups 0 … max of the ``field`` column. Raises MetadataError: no such column, a value < 0."""
    col = fields.index(field)
    if metadata_NM.ndim != 2 or metadata_NM.shape[1] <= col:
        columns = metadata_NM.shape[1] if metadata_NM.ndim == 2 else 0
        raise MetadataError(f"metadata rows of {columns} columns; '{field}' is column {col} of {list(fields)}")
    group_N = metadata_NM[:, col].long()
    if group_N.min() < 0:
        raise MetadataError(f"metadata field '{field}' has a negative value ({group_N.min().item()})")
    accuracy_G, count_G = group_accuracy(correct_N, group_N, int(group_N.max()) + 1)
    out = {}
    for g in range(len(count_G)):
        out[f"{name}_{field}:{g}"] = accuracy_G[g].item()
        out[f"count_{field}:{g}"] = int(count_G[g])
    return out, worst_group(accuracy_G, count_G)


def macro_f1_recall(pred_N: Tensor, labels_N: Tensor) -> tuple[float, float]:
    """``(F1, recall)`` averaged over the classes present in ``labels_N`` (sklearn's ``average="macro"``
    with ``labels=unique(labels)``); predicting a class absent from the labels is only a miss of the true one."""
    pred_N, labels_N = pred_N.long(), labels_N.long()
    classes = torch.unique(labels_N)
    size = int(max(pred_N.max(), labels_N.max())) + 1
    tp = torch.bincount(labels_N[pred_N == labels_N], minlength=size).double()[classes]
    support = torch.bincount(labels_N, minlength=size).double()[classes]
    predicted = torch.bincount(pred_N, minlength=size).double()[classes]
    fn, fp = support - tp, predicted - tp
    f1 = (2 * tp / (2 * tp + fp + fn)).mean().item()
    recall = (tp / support).mean().item()
    return f1, recall


def _correct(logits_NC: Tensor, labels_N: Tensor, k: int = 1) -> Tensor:
    return (rank_of_target(logits_NC, labels_N) <= k).double()


def _iwildcam(logits_NC: Tensor, labels_N: Tensor, metadata_NM: Tensor | None, fields: tuple[str, ...]) -> dict:
    f1, recall = macro_f1_recall(logits_NC.argmax(dim=1), labels_N)
    return {"acc_avg": _correct(logits_NC, labels_N).mean().item(), "recall-macro_all": recall, "F1-macro_all": f1}


def _by(field: str, name: str = "acc", k: int = 1, worst: str = "") -> Callable:
    """An evaluator grouping top-``k`` accuracy by ``field``: ``{name}_avg``, the groups and the worst
    group as ``worst`` (default ``{name}_wg``)."""

    def score(logits_NC: Tensor, labels_N: Tensor, metadata_NM: Tensor | None, fields: tuple[str, ...]) -> dict:
        correct_N = _correct(logits_NC, labels_N, k)
        groups, worst_value = grouped(name, correct_N, metadata_NM, fields, field)
        return {f"{name}_avg": correct_N.mean().item(), **groups, (worst or f"{name}_wg"): worst_value}

    return score


def _fmow(logits_NC: Tensor, labels_N: Tensor, metadata_NM: Tensor | None, fields: tuple[str, ...]) -> dict:
    out = _by("year", worst="acc_worst_year")(logits_NC, labels_N, metadata_NM, fields)
    regions, worst_region = grouped("acc", _correct(logits_NC, labels_N), metadata_NM, fields, "region")
    return {**out, **regions, "acc_worst_region": worst_region}


EVALUATORS: dict[str, Evaluator] = {
    "wilds/iwildcam": Evaluator(
        ("location", "sequence", "year", "month", "day", "hour", "minute", "second", "y"), _iwildcam, False
    ),
    "wilds/camelyon17": Evaluator(("hospital", "slide", "y"), _by("slide")),
    "wilds/fmow": Evaluator(("region", "year", "y"), _fmow),
    "dollar_street": Evaluator(("income_ds", "income_meta", "region"), _by("income_ds", "acc_top5", k=5)),
    "geode": Evaluator(("region", "country"), _by("region")),
}


def evaluator_name(dataset: str) -> str:
    """The evaluator of a CLIP_benchmark / DataComp dataset name (``wds/`` and DataComp's
    ``fairness/`` prefixes dropped), '' when DataComp scores it by accuracy alone."""
    short = dataset.removeprefix("wds/").removeprefix("fairness/")
    return short if short in EVALUATORS else ""


@torch.no_grad()
def datacomp_metrics(name: str, logits_NC: Tensor, labels_N: Tensor, metadata_NM: Tensor | None) -> dict:
    """DataComp's metrics of evaluator ``name`` (see the module docstring for the keys).

    Args:
        logits_NC: scores, no NaN. labels_N: class indices. metadata_NM: integer metadata rows in the
            evaluator's field order (None for iWildCam, which needs none).
    Raises:
        KeyError: unknown evaluator. MetadataError: metadata missing, too few columns, negative values.
    """
    evaluator = EVALUATORS[name]
    if evaluator.needs_metadata and metadata_NM is None:
        raise MetadataError(f"{name}: needs each sample's metadata row ({', '.join(evaluator.fields)})")
    labels_N = labels_N.to(logits_NC.device, torch.long)
    return evaluator.score(logits_NC, labels_N, metadata_NM, evaluator.fields)
