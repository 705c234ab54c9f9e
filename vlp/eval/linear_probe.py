"""Linear probe: logistic regression on frozen image features, with CLIP_benchmark's protocol.

Follows LAION's CLIP_benchmark 1.6.2 (``clip_benchmark/metrics/linear_probe.py`` and the train/val
split in its ``cli.py``), run as its README's "tune on a validation split" command
(``--val_proportion 0.1 --fewshot_lr 0.1 --fewshot_epochs 20 --batch_size 512``):

1. Features are L2-normalised (their ``Featurizer``, ``normalize=True``).
2. The train split is permuted with the seed; the last ``floor(p * N)`` samples are the validation
   part (``torch.utils.data.random_split(train, [1 - p, p])``).
3. Weight decay is searched on :data:`WEIGHT_DECAYS` (``logspace(-6, 2, 97)``): first its 7 points
   ``10^-6, 10^-4.67, ..., 10^2`` (indices 0, 16, ..., 96), then 4 rounds that look at
   ``peak - s, peak, peak + s`` (clipped) for s = 8, 4, 2, 1. Each point is a classifier trained on
   the train part and scored by top-1 accuracy on the validation part; a round's peak is the
   first index with a strictly higher accuracy than those before it, starting from index 0 with
   accuracy 0 (their ``find_peak``, including its fallback to index 0 when every accuracy is 0).
4. A classifier with the chosen weight decay is trained on the whole train split (train + val, as
   they do for ``fewshot_k = -1``) and scored on the test split.

Training (:func:`train_linear`, their ``train``): ``nn.Linear(D, C)`` with its default init,
AdamW (default betas/eps) with decoupled weight decay on weight and bias, mean cross-entropy per
mini-batch of ``batch_size`` (the last one smaller), a fresh shuffle every epoch, and a cosine
learning rate without warmup, set per step before the update: ``lr_t = lr * (1 + cos(pi * t / T)) / 2``
with ``T = epochs * ceil(N / batch_size)``.

Metrics: ``acc1``, ``acc5``, ``mean_per_class_recall`` as :func:`vlp.eval.zeroshot.classification_metrics`
defines them for the zero-shot task (equal to CLIP_benchmark's ``accuracy`` and
``balanced_accuracy_score``), plus ``best_weight_decay``, ``n_train``, ``n_test``.

Deviations from CLIP_benchmark, none of which changes the math:

* Randomness comes from a private ``torch.Generator`` seeded with ``seed`` (the global RNG is left
  alone: the trainer's RNG state must not depend on evaluation). The initial weights are
  bit-equal to ``torch.manual_seed(seed); nn.Linear(D, C)``; the epoch shuffles are drawn from the
  same generator, whereas their DataLoader draws sampler seeds from the global RNG, so the
  mini-batch order (not its distribution) differs and results agree up to SGD noise.
* The candidates of a search round are trained side by side, as one classifier with K*C outputs
  (their separate runs share the init and the mini-batches, so each candidate's updates are
  unchanged), and a weight decay already scored is not trained again (their retraining with the
  same seed gives the same classifier). That is 6 training runs instead of 20.
* Their validation accuracy of a diverged classifier (NaN logits) is whatever ``topk`` returns
  for NaN; here a row with a non-finite logit is wrong. Weight decays above ``2 / lr`` (20 and up
  for lr 0.1) diverge in both: AdamW's decay factor ``1 - lr_t * wd`` is below -1.
* A validation part of 0 samples (fewer than ``1 / p`` training samples) falls back to weight
  decay 0 on the whole train split, their behaviour without a validation split (theirs would fail).
* ``acc5`` is nan when C < 5 (the zero-shot rule); theirs is nan when the test labels' maximum is
  below 5, which differs only for C = 5 or a test split missing its highest classes.
* Everything runs in float32 without autocast (their default ``--amp`` autocasts on GPU).

Shape legend: N train samples, V validation samples, M test samples, D feature dim, C classes,
K classifiers trained side by side, B mini-batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vlp.eval.zeroshot import classification_metrics

log = logging.getLogger(__name__)

# the same floats as CLIP_benchmark's np.logspace(-6, 2, num=97).tolist(): chosen values compare equal
WEIGHT_DECAYS: list[float] = np.logspace(-6, 2, num=97).tolist()
# the indices of np.logspace(-6, 2, num=7) within WEIGHT_DECAYS (their float-equality lookup finds all 7)
INITIAL_INDICES = tuple(range(0, len(WEIGHT_DECAYS), 16))
REFINE_SPANS = (8, 4, 2, 1)


def _check(feats_ND: Tensor, labels_N: Tensor, num_classes: int, what: str) -> None:
    if feats_ND.ndim != 2 or labels_N.ndim != 1 or feats_ND.shape[0] != labels_N.shape[0]:
        raise ValueError(
            f"{what}: expected features [N, D] and labels [N], got {tuple(feats_ND.shape)}, {tuple(labels_N.shape)}"
        )
    if labels_N.numel() == 0:
        raise ValueError(f"{what}: no samples")
    if labels_N.is_floating_point() or labels_N.min() < 0 or labels_N.max() >= num_classes:
        raise ValueError(f"{what}: labels must be integers in [0, {num_classes})")


def split_train_val(n: int, val_proportion: float, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Indices ``(train, val)`` of a seeded random split of ``n`` samples, ``floor(p * n)`` to val.

    Same sizes as ``torch.utils.data.random_split(range(n), [1 - p, p])`` (the remainder goes to
    train); val is the tail of ``torch.randperm(n)`` drawn from a generator seeded with ``seed``.
    Raises ValueError unless ``0 <= val_proportion < 1``.
    """
    if not 0 <= val_proportion < 1:
        raise ValueError(f"val_proportion must be in [0, 1), got {val_proportion}")
    perm_N = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = math.floor(n * val_proportion)
    return perm_N[: n - n_val], perm_N[n - n_val :]


def train_linear(
    feats_ND: Tensor,
    labels_N: Tensor,
    num_classes: int,
    weight_decays: Sequence[float],
    *,
    lr: float = 0.1,
    epochs: int = 20,
    batch_size: int = 512,
    seed: int = 0,
) -> tuple[Tensor, Tensor]:
    """K = ``len(weight_decays)`` linear classifiers fit by AdamW + cosine schedule, side by side.

    Each is what one CLIP_benchmark ``train`` call with that weight decay and ``seed`` computes
    (see the module docstring): they reseed per call, so all K start from the same weights and
    see the same mini-batches; training them as one batched tensor changes nothing but the speed.

    Args:
        feats_ND: float features (used as given: normalise them first if wanted).
        labels_N: integer labels in [0, num_classes).
        weight_decays: AdamW's decoupled weight decay of each classifier (applied to the bias too).
    Returns:
        ``(weight_KCD, bias_KC)``, detached float32 on ``feats_ND``'s device; classifier k's
        logits are ``feats @ weight_KCD[k].T + bias_KC[k]``.
    Raises:
        ValueError: bad shapes or labels, no weight decay, ``epochs`` or ``batch_size`` < 1.
    """
    _check(feats_ND, labels_N, num_classes, "train")
    if epochs < 1 or batch_size < 1 or not len(weight_decays):
        raise ValueError(
            f"need epochs, batch_size >= 1 and a weight decay; got {epochs}, {batch_size}, {weight_decays}"
        )
    (n, dim), k, device = feats_ND.shape, len(weight_decays), feats_ND.device
    gen = torch.Generator().manual_seed(seed)
    bound = 1 / math.sqrt(dim)  # nn.Linear's init: kaiming_uniform_(a=sqrt(5)) on the weight, then the bias
    weight_CD = torch.empty(num_classes, dim).uniform_(-bound, bound, generator=gen)
    bias_C = torch.empty(num_classes).uniform_(-bound, bound, generator=gen)
    weight_KCD = weight_CD.expand(k, -1, -1).to(device, copy=True).requires_grad_()
    bias_KC = bias_C.expand(k, -1).to(device, copy=True).requires_grad_()
    feats_ND, labels_N = feats_ND.float(), labels_N.to(device, torch.long)
    # Adam without decay, plus the decoupled decay done by hand first: torch's AdamW step, per classifier
    optimizer = torch.optim.Adam([weight_KCD, bias_KC], lr=lr)
    per_epoch = math.ceil(n / batch_size)
    total = epochs * per_epoch
    with torch.enable_grad():
        for epoch in range(epochs):
            perm_N = torch.randperm(n, generator=gen).to(device)
            for i in range(per_epoch):
                lr_t = 0.5 * (1 + math.cos(math.pi * (epoch * per_epoch + i) / total)) * lr
                batch_B = perm_N[i * batch_size : (i + 1) * batch_size]
                # one matmul for the K classifiers stacked as K*C outputs (faster than a batched one)
                logits_BKC = F.linear(feats_ND[batch_B], weight_KCD.flatten(0, 1), bias_KC.flatten())
                # the sum of each classifier's mean cross-entropy: each gets its own mean's gradient
                labels_BK = labels_N[batch_B].repeat_interleave(k)
                loss = F.cross_entropy(logits_BKC.view(-1, num_classes), labels_BK, reduction="sum")
                optimizer.zero_grad(set_to_none=True)
                (loss / len(batch_B)).backward()
                with torch.no_grad():  # the factor in float64 then float32, as AdamW's scalar
                    decay_K11 = torch.tensor([1 - lr_t * wd for wd in weight_decays], device=device).view(k, 1, 1)
                    weight_KCD.mul_(decay_K11)
                    bias_KC.mul_(decay_K11[:, 0])
                optimizer.param_groups[0]["lr"] = lr_t
                optimizer.step()
    return weight_KCD.detach(), bias_KC.detach()


def _logits(weight_CD: Tensor, bias_C: Tensor, feats_ND: Tensor) -> Tensor:
    """Logits with NaN -> -inf: a diverged classifier (weight decay > 2 / lr) scores, not crashes."""
    return F.linear(feats_ND.float().to(weight_CD.device), weight_CD, bias_C).nan_to_num(nan=-math.inf)


def _acc1(logits_NC: Tensor, labels_N: Tensor) -> float:
    """Top-1 accuracy (argmax: first maximum); a row with a non-finite logit counts as wrong."""
    hit_N = (logits_NC.argmax(dim=1) == labels_N.to(logits_NC.device)) & logits_NC.isfinite().all(dim=1)
    return hit_N.double().mean().item()


def _find_peak(indices: Sequence[int], acc: dict[int, float]) -> int:
    """CLIP_benchmark's ``find_peak``: first index with a strictly higher accuracy, from (0, 0)."""
    best, best_acc = 0, 0.0
    for i in indices:
        if acc[i] > best_acc:
            best, best_acc = i, acc[i]
    return best


def search_grid(score: Callable[[list[int]], list[float]]) -> tuple[int, dict[int, float]]:
    """CLIP_benchmark's coarse-to-fine search over the indices of :data:`WEIGHT_DECAYS`.

    ``score(indices)`` returns the validation accuracy of each index; every index is scored once
    (the 7 initial ones in one call). Returns the chosen index and the accuracy of every index tried.
    """
    tried: dict[int, float] = {}

    def peak_of(indices: Sequence[int]) -> int:
        if new := [i for i in dict.fromkeys(indices) if i not in tried]:
            tried.update(zip(new, score(new)))
        return _find_peak(indices, tried)

    peak = peak_of(INITIAL_INDICES)
    for span in REFINE_SPANS:
        peak = peak_of([max(peak - span, 0), peak, min(peak + span, len(WEIGHT_DECAYS) - 1)])
    return peak, dict(sorted(tried.items()))


def search_weight_decay(
    train_feats_ND: Tensor, train_labels_N: Tensor, val_feats_VD: Tensor, val_labels_V: Tensor, num_classes: int, **fit
) -> tuple[float, dict[float, float]]:
    """The weight decay of :func:`search_grid` with classifiers trained on train, scored on val.

    ``fit`` goes to :func:`train_linear` (lr, epochs, batch_size, seed). Returns the chosen weight
    decay (an element of :data:`WEIGHT_DECAYS`) and the validation top-1 accuracy of each one
    tried. Raises ValueError as :func:`train_linear`, or for an empty validation split.
    """
    _check(val_feats_VD, val_labels_V, num_classes, "val")

    def score(indices: list[int]) -> list[float]:
        wds = [WEIGHT_DECAYS[i] for i in indices]
        weight_KCD, bias_KC = train_linear(train_feats_ND, train_labels_N, num_classes, wds, **fit)
        return [_acc1(_logits(w_CD, b_C, val_feats_VD), val_labels_V) for w_CD, b_C in zip(weight_KCD, bias_KC)]

    peak, tried = search_grid(score)
    return WEIGHT_DECAYS[peak], {WEIGHT_DECAYS[i]: acc for i, acc in tried.items()}


@torch.no_grad()
def linear_probe(
    train_feats_ND: Tensor,
    train_labels_N: Tensor,
    test_feats_MD: Tensor,
    test_labels_M: Tensor,
    num_classes: int,
    *,
    seed: int = 0,
    lr: float = 0.1,
    epochs: int = 20,
    batch_size: int = 512,
    val_proportion: float = 0.1,
    normalize: bool = True,
) -> dict:
    """The whole protocol: normalise, split, search weight decay, refit on all of train, test.

    Deterministic given ``seed`` (on one device and thread count); the global RNG is not touched.
    Returns:
        ``acc1``, ``acc5`` (nan if C < 5), ``mean_per_class_recall`` (floats in [0, 1]),
        ``best_weight_decay`` (0.0 when the validation part is empty), ``n_train``, ``n_test``,
        ``num_classes`` and ``chance`` (1/C).
    Raises:
        ValueError: empty splits, shapes or feature dims that differ, labels outside [0, C),
            ``val_proportion`` outside [0, 1).
    """
    _check(train_feats_ND, train_labels_N, num_classes, "train")
    _check(test_feats_MD, test_labels_M, num_classes, "test")
    if train_feats_ND.shape[1] != test_feats_MD.shape[1]:
        raise ValueError(f"train and test feature dims differ: {train_feats_ND.shape[1]} vs {test_feats_MD.shape[1]}")
    if normalize:
        train_feats_ND, test_feats_MD = (
            F.normalize(train_feats_ND.float(), dim=-1),
            F.normalize(test_feats_MD.float(), dim=-1),
        )
    fit = dict(lr=lr, epochs=epochs, batch_size=batch_size, seed=seed)
    fit_idx, val_idx = split_train_val(len(train_labels_N), val_proportion, seed)
    best_wd = 0.0
    if len(val_idx):
        labels_N = train_labels_N.to(train_feats_ND.device)
        fit_F, val_V = (idx.to(train_feats_ND.device) for idx in (fit_idx, val_idx))
        fit_feats, val_feats = train_feats_ND[fit_F], train_feats_ND[val_V]
        best_wd, tried = search_weight_decay(fit_feats, labels_N[fit_F], val_feats, labels_N[val_V], num_classes, **fit)
        log.info(
            "linear_probe: weight decay %.3g (validation acc1 %.4f on %d samples; %d tried)",
            best_wd,
            tried[best_wd],
            len(val_V),
            len(tried),
        )
    weight_1CD, bias_1C = train_linear(train_feats_ND, train_labels_N, num_classes, [best_wd], **fit)
    metrics = classification_metrics(_logits(weight_1CD[0], bias_1C[0], test_feats_MD), test_labels_M, topk=(1, 5))
    metrics.update(best_weight_decay=best_wd, n_train=len(train_labels_N), n_test=len(test_labels_M))
    metrics.update(num_classes=num_classes, chance=1.0 / num_classes)
    return metrics
