"""Captioning evaluation: caption images with a CoCa model, score against reference captions.

Metrics are the COCO caption evaluation's (coco-caption, as packaged by ``pycocoevalcap``):

* ``bleu4``: corpus BLEU-4 (Papineni et al.), n-gram counts clipped by the maximum count in any
  reference of the image, summed over the corpus; brevity penalty from the sum over images of the
  reference length closest to the candidate's. coco-caption's smoothing is kept: an order with no
  candidate n-gram counts as precision 1e-6, so a corpus of captions shorter than 4 words scores
  near 0, even when they equal their references.
* ``cider``: CIDEr-D (Vedantam et al.), coco-caption's ``Cider`` scorer: tf-idf n-gram vectors,
  n = 1..4, document frequencies over the references of the evaluated images (so a single image
  scores 0), clipped candidate weights, a gaussian length penalty (sigma = 6), mean over n and over
  the references, x 10.

Deviation: coco-caption tokenises with Stanford's PTBTokenizer (Java) and then drops punctuation
tokens. vlp does not run Java: :func:`normalize_caption` lowercases and replaces every character
that is not a letter or digit with a space. Both agree on plain-word captions; they differ on
clitics and hyphenated words (PTB: "dog 's", "red-haired"; here: "dog s", "red haired").

``pycocoevalcap`` is imported lazily (only ``--task captioning`` needs it; its wheel carries 100
MB of Java jars vlp never uses): ``pip install pycocoevalcap`` or ``pip install vlp[captioning]``.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vlp.distributed import DistEnv, all_gather_objects


class MissingDependencyError(ImportError):
    """An optional package a command needs is not installed; the message says what to install."""


def _scorers():
    """coco-caption's ``Bleu`` and ``Cider`` classes; MissingDependencyError if not installed."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:
        raise MissingDependencyError(
            "captioning metrics need pycocoevalcap (COCO's BLEU and CIDEr scorers): "
            "pip install pycocoevalcap  (or: pip install 'vlp[captioning]')"
        ) from None
    return Bleu, Cider


def require_scorers() -> None:
    """Fail early, before any caption is generated, when the scorers are not installed."""
    _scorers()


def normalize_caption(text: str) -> str:
    """Lowercase, every non-alphanumeric character -> space, single spaces (see module docstring)."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def caption_scores(candidates: Sequence[str], references: Sequence[Sequence[str]]) -> dict:
    """Corpus ``{"bleu4", "cider"}`` of one candidate per image against that image's references.

    Both sides are normalised with :func:`normalize_caption`. An empty candidate scores 0.
    Raises ValueError: no candidates, lengths differ, an image without references.
    MissingDependencyError: pycocoevalcap is not installed.
    """
    if not candidates:
        raise ValueError("no captions to score")
    if len(candidates) != len(references):
        raise ValueError(f"{len(candidates)} candidates but {len(references)} reference lists")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every image needs at least one reference caption")
    Bleu, Cider = _scorers()
    res = {i: [normalize_caption(c)] for i, c in enumerate(candidates)}
    gts = {i: [normalize_caption(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@torch.no_grad()
def caption_image_list(
    model,
    tokenizer,
    images: list,
    preprocess,
    env: DistEnv,
    *,
    batch_size: int = 32,
    workers: int = 0,
    desc: str = "captions",
    policy=None,
    **generate_kw,
) -> tuple[dict[int, str], list[tuple[int, str]]]:
    """Caption ``images`` (paths or encoded bytes), sharded over ranks as feature extraction is:
    rank r of W captions images r, r + W, ...; the captions are all-gathered.

    ``generate_kw`` go to :func:`vlp.models.generate.generate_captions`. Returns, on every rank,
    ``({image index: caption}, [(index, kind) of the images that could not be read]``, kinds as
    :class:`vlp.eval.datasets.ImageList`). Raises GenerationError (not a CoCa model, bad settings).
    """
    from vlp.eval.datasets import ImageList
    from vlp.models.generate import caption_images, check_captioner

    check_captioner(model)
    dataset = ImageList(images, preprocess, policy=policy)  # policy: vlp.data.images.ImagePolicy
    mine = Subset(dataset, range(env.rank, len(images), env.world))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=ImageList.collate)
    captions, failed = {}, []
    for indices, pixels, bad in tqdm(loader, desc=desc, disable=None if env.is_main else True, leave=False):
        failed += bad
        if len(indices):
            texts = caption_images(model, tokenizer, pixels.to(env.device), **generate_kw)
            captions.update(zip(indices.tolist(), texts))
    all_captions, all_failed = {}, []
    for part_captions, part_failed in all_gather_objects((captions, failed), env):
        all_captions.update(part_captions)
        all_failed += part_failed
    return all_captions, sorted(all_failed)


def evaluate_captioning(model, tokenizer, data, preprocess, env: DistEnv, *, batch_size=32, workers=0, **kw) -> dict:
    """The ``captioning`` task on an :class:`~vlp.eval.datasets.EvalData` with flat ``captions``
    and ``text_to_image``: ``bleu4``, ``cider``, ``num_images`` and ``examples`` (the first 5
    images with their caption and references). Unreadable images are counted in ``data.skipped``.

    Raises GenerationError (not a CoCa model), MissingDependencyError (no pycocoevalcap), both
    before any image is read; EvalDataError when no image could be read.
    """
    from vlp.eval.datasets import EvalDataError
    from vlp.models.generate import max_caption_len

    limit = max_caption_len(model)  # also: GenerationError for a model without a text decoder
    require_scorers()
    kw.setdefault("strategy", "beam")
    kw.setdefault("max_len", min(30, limit))
    captions, failed = caption_image_list(
        model, tokenizer, data.images, preprocess, env, batch_size=batch_size, workers=workers, **kw
    )
    for kind, n in Counter(kind for _, kind in failed).items():
        data.skipped[kind] = data.skipped.get(kind, 0) + n
    if not captions:
        raise EvalDataError(f"{data.name}: captioning found no readable image; skipped: {data.skipped}")
    references = [[] for _ in data.images]
    for caption, image in zip(data.captions, data.text_to_image):
        references[image].append(caption)
    kept = sorted(captions)
    out = caption_scores([captions[i] for i in kept], [references[i] for i in kept])
    out["num_images"] = len(kept)
    out["examples"] = [
        {"image": _label(data.images[i], i), "caption": captions[i], "references": references[i]} for i in kept[:5]
    ]
    return out


def _label(image, index: int) -> str:
    """An image's path, or ``#index`` for images held as bytes (from shards)."""
    return image if isinstance(image, str) else f"#{index}"
