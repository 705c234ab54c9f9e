"""Image-text retrieval recall@k and mean rank, blocked so the full similarity matrix never exists.

Definitions follow LAION's CLIP_benchmark 1.6.x (``clip_benchmark/metrics/zeroshot_retrieval.py``,
``recall_at_k`` thresholded at ``> 0`` and averaged, computed through ``batchify``):

* ``image_retrieval_recall@k``: per text, is its image among the k most similar images; mean over
  texts.
* ``text_retrieval_recall@k``: per image, is at least one of its captions among the k most similar
  texts; mean over images.

Ties: as in :func:`vlp.eval.zeroshot.rank_of_target`, equal scores rank the lower index first.
CLIP_benchmark's ``torch.topk`` leaves the order of ties unspecified (in practice an arbitrary
subset of the tied indices is kept), so the two agree whenever no tie straddles the top-k boundary.

k larger than the number of candidates: CLIP_benchmark's ``torch.topk`` raises a RuntimeError;
here k is clamped to the number of candidates, so such a recall is 1.0.

Shape legend: N images, M texts (captions), D embedding dim, B rows of one block.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from vlp.eval.zeroshot import rank_of_target


def _check_retrieval_inputs(image_ND: Tensor, text_MD: Tensor, text_to_image_M: Tensor) -> None:
    """Raise ValueError on bad shapes, non-finite features, or a bad text-to-image map."""
    if image_ND.ndim != 2 or text_MD.ndim != 2 or image_ND.shape[1] != text_MD.shape[1]:
        shapes = f"{tuple(image_ND.shape)} and {tuple(text_MD.shape)}"
        raise ValueError(f"expected image [N, D] and text [M, D] features, got {shapes}")
    num_images, num_texts = image_ND.shape[0], text_MD.shape[0]
    if num_images == 0 or num_texts == 0:
        raise ValueError("need at least one image and one text")
    if text_to_image_M.shape != (num_texts,) or text_to_image_M.is_floating_point():
        raise ValueError(f"text_to_image must be an integer tensor of shape ({num_texts},)")
    if text_to_image_M.min() < 0 or text_to_image_M.max() >= num_images:
        raise ValueError(f"text_to_image values must lie in [0, {num_images})")
    if not (torch.isfinite(image_ND).all() and torch.isfinite(text_MD).all()):
        raise ValueError("features contain NaN or inf")
    captions_N = torch.bincount(text_to_image_M.long(), minlength=num_images)
    if (captions_N == 0).any():
        # CLIP_benchmark would divide 0/0 and silently count such an image as a miss
        missing = torch.nonzero(captions_N == 0).flatten()[:5].tolist()
        raise ValueError(f"every image needs at least one text; images without one include {missing}")


def image_retrieval_ranks(image_ND: Tensor, text_MD: Tensor, text_to_image_M: Tensor, block_size: int) -> Tensor:
    """Per text, the 1-based rank of its image among all N images; LongTensor[M].

    Similarities are computed ``block_size`` texts at a time (peak memory O(block_size * N)).
    """
    ranks = []
    for start in range(0, text_MD.shape[0], block_size):
        sim_BN = text_MD[start : start + block_size] @ image_ND.T
        ranks.append(rank_of_target(sim_BN, text_to_image_M[start : start + block_size]))
    return torch.cat(ranks)


def text_retrieval_ranks(image_ND: Tensor, text_MD: Tensor, text_to_image_M: Tensor, block_size: int) -> Tensor:
    """Per image, the 1-based rank of its best-ranked caption among all M texts; LongTensor[N].

    Similarities are computed ``block_size`` images at a time (peak memory O(block_size * M)).
    """
    ranks = []
    for start in range(0, image_ND.shape[0], block_size):
        sim_BM = image_ND[start : start + block_size] @ text_MD.T
        rows_B1 = torch.arange(start, start + sim_BM.shape[0], device=sim_BM.device).unsqueeze(1)
        is_caption_BM = text_to_image_M.unsqueeze(0) == rows_B1
        # argmax keeps the first maximum: the best caption under the lower-index tie rule
        best_B = sim_BM.masked_fill(~is_caption_BM, float("-inf")).argmax(dim=1)
        ranks.append(rank_of_target(sim_BM, best_B))
    return torch.cat(ranks)


@torch.no_grad()
def retrieval_metrics(
    image_features_ND: Tensor,
    text_features_MD: Tensor,
    text_to_image_M: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
) -> dict:
    """Recall@k both ways and mean ranks, for texts each belonging to one image.

    Features are assumed L2-normalised and are not renormalised (similarity = dot product). The
    result does not depend on ``block_size``. Ties rank the lower index first; k above the number
    of candidates is clamped (both: see module docstring).

    Args:
        image_features_ND: image embeddings.
        text_features_MD: text embeddings, same device and dtype as the images.
        text_to_image_M: integer image index of each text; every image needs at least one text.
        ks: the k of each recall key.
        block_size: rows of the similarity matrix computed at once.
    Returns:
        ``image_retrieval_recall@{k}``, ``text_retrieval_recall@{k}`` (floats in [0, 1]),
        ``image_retrieval_mean_rank`` (mean over texts of the rank of its image, 1-based),
        ``text_retrieval_mean_rank`` (mean over images of the rank of its best caption, 1-based),
        ``num_images``, ``num_texts`` (ints).
    Raises:
        ValueError: bad shapes, non-finite features, text_to_image out of range, an image without
            text, k < 1, block_size < 1.
    """
    if any(k < 1 for k in ks):
        raise ValueError(f"ks must be >= 1, got {tuple(ks)}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    _check_retrieval_inputs(image_features_ND, text_features_MD, text_to_image_M)
    text_to_image_M = text_to_image_M.to(image_features_ND.device, torch.long)
    args = (image_features_ND, text_features_MD, text_to_image_M, block_size)
    image_rank_M = image_retrieval_ranks(*args)
    text_rank_N = text_retrieval_ranks(*args)
    metrics = {}
    for k in ks:
        # a rank never exceeds the number of candidates, so k beyond it is clamped for free
        metrics[f"image_retrieval_recall@{k}"] = (image_rank_M <= k).double().mean().item()
        metrics[f"text_retrieval_recall@{k}"] = (text_rank_N <= k).double().mean().item()
    metrics["image_retrieval_mean_rank"] = image_rank_M.double().mean().item()
    metrics["text_retrieval_mean_rank"] = text_rank_N.double().mean().item()
    metrics["num_images"] = int(image_features_ND.shape[0])
    metrics["num_texts"] = int(text_features_MD.shape[0])
    return metrics


def paired_retrieval_metrics(
    image_features_ND: Tensor,
    text_features_ND: Tensor,
    *,
    ks: Sequence[int] = (1, 5, 10),
    block_size: int = 1024,
) -> dict:
    """:func:`retrieval_metrics` for one caption per image, text i belonging to image i.

    Raises:
        ValueError: different numbers of images and texts, or as :func:`retrieval_metrics`.
    """
    if image_features_ND.shape[0] != text_features_ND.shape[0]:
        raise ValueError(
            f"paired retrieval needs as many texts as images, got {text_features_ND.shape[0]} "
            f"texts for {image_features_ND.shape[0]} images"
        )
    text_to_image_N = torch.arange(image_features_ND.shape[0], device=image_features_ND.device)
    return retrieval_metrics(image_features_ND, text_features_ND, text_to_image_N, ks=ks, block_size=block_size)


def _any_caption_chance(num_texts: int, num_captions: int, k: int) -> float:
    """P(at least one of ``num_captions`` texts in the top k of a random order of ``num_texts``)."""
    none_in_topk = 1.0
    for j in range(min(k, num_texts)):
        # hypergeometric: the j-th drawn text is again not a caption
        none_in_topk *= max(num_texts - num_captions - j, 0) / (num_texts - j)
    return 1.0 - none_in_topk


def retrieval_chance(num_images: int, num_texts: int, k: int) -> dict:
    """Expected recall@k of a uniformly random ranking, both directions.

    Image retrieval: min(k, N) / N. Text retrieval: per image with m captions among M texts,
    1 - C(M - m, k) / C(M, k), averaged over images, with the captions assumed spread as evenly as
    possible (m = M // N or M // N + 1). With one caption per image both are k / N.

    Returns:
        ``{"image_retrieval_recall@{k}": float, "text_retrieval_recall@{k}": float}``.
    Raises:
        ValueError: num_images < 1, num_texts < num_images (an image would have no text), k < 1.
    """
    if num_images < 1 or num_texts < num_images or k < 1:
        raise ValueError(
            f"need num_images >= 1, num_texts >= num_images and k >= 1, got {num_images}, {num_texts}, {k}"
        )
    base, extra = divmod(num_texts, num_images)
    text_chance = (
        (num_images - extra) * _any_caption_chance(num_texts, base, k)
        + extra * _any_caption_chance(num_texts, base + 1, k)
    ) / num_images
    return {
        f"image_retrieval_recall@{k}": min(k, num_images) / num_images,
        f"text_retrieval_recall@{k}": text_chance,
    }
