"""Per-sample extra captions of a training batch: hard negatives and counting counterfactuals.

Added to a batch (see :class:`vlp.data.stream.ShardStream`) when configured:

- ``text_neg`` (B x K x L tokens, sample-major): K hard negatives per sample. They come from the
  shard's JSON field (``vlp negatives`` writes ``[{"text", "type"}, ...]``; they describe the
  sample's own ``txt``, so they are used only when that is the batch's caption), then, online, from
  the rule-based generator (:func:`vlp.data.negatives.generate`). A sample with fewer than K
  repeats its negatives; one with none (no word the generator knows) takes its caption's words
  reversed, or failing that the next sample's caption. ``neg_sources`` counts where they came from.
- ``text_cf`` (B x L) and ``has_cf`` (B bool): the counting counterfactual
  (:func:`vlp.data.counting.counterfactual`) of every caption with exactly one count in 2..10;
  others carry their own caption and ``has_cf`` False.
- ``pair_id`` (B int64): the sample's minimal pair or group, or -1. In the data, a pair or group is
  a run of consecutive samples whose JSON holds the same integer ``pair`` (``vlp shards --synthetic
  --counterfactual-pairs``, 0 <= pair < 2**40); the batch's id names the run (:func:`source_pair_id`).
  Two to PAIR_GROUP_LIMIT samples of a batch with the same id are a minimal pair or group for
  ``loss.pair_weight``; samples of two runs never are, even when their JSON ids are equal (another
  shard, another source).

Every random choice is seeded from (seed, sample key, epoch): reproducible and exact on resume.
"""

from __future__ import annotations

import random
import zlib
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class ExtraCaptionSpec:
    negatives_k: int = 0
    negatives_field: str = "hard_negatives"
    negatives_online: bool = True
    negatives_types: tuple[str, ...] = ()
    counterfactuals: bool = False
    pairs: bool = False  # add pair_id
    seed: int = 0
    sources: Counter = field(default_factory=Counter)  # where negatives came from (shard/online/fallback)

    @property
    def active(self) -> bool:
        return bool(self.negatives_k or self.counterfactuals or self.pairs)


def sample_seed(seed: int, key: str, epoch: int, what: str) -> int:
    """A stable 32-bit seed (Python's ``hash`` of a string changes between processes)."""
    return zlib.crc32(f"{what}/{seed}/{key}/{epoch}".encode())


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _from_shard(sample: dict, spec: ExtraCaptionSpec) -> list[str]:
    if sample["text"] != sample.get("_own", sample["text"]):
        return []  # the shard's negatives describe `txt`, not the drawn caption variant
    meta = sample.get("json")
    rows = meta.get(spec.negatives_field) if isinstance(meta, dict) else None
    if not isinstance(rows, list):
        return []
    texts = [r.get("text") if isinstance(r, dict) else r for r in rows]
    return [t.strip() for t in texts if isinstance(t, str) and t.strip()]


def negatives_for(sample: dict, spec: ExtraCaptionSpec, next_caption: str) -> list[str]:
    """K negatives of one sample (see the module docstring for the order of sources)."""
    from vlp.data.negatives import generate

    caption, k = sample["text"], spec.negatives_k
    seen, out = {_norm(caption)}, []

    def take(texts, source):
        for t in texts:
            if len(out) < k and _norm(t) not in seen:
                seen.add(_norm(t))
                out.append(t)
                spec.sources[source] += 1

    take(_from_shard(sample, spec), "shard")
    if len(out) < k and spec.negatives_online:
        seed = sample_seed(spec.seed, sample["__key__"], sample.get("_epoch", 0), "negatives")
        take([t for t, _ in generate(caption, spec.negatives_types, k - len(out), seed)], "online")
    if not out:
        take([" ".join(reversed(caption.split())), next_caption], "fallback")
    if not out:
        out, spec.sources["fallback"] = [caption + " ."], spec.sources["fallback"] + 1  # a one-word caption alone
    return [out[i % len(out)] for i in range(k)]


def counterfactual_for(sample: dict, spec: ExtraCaptionSpec) -> str | None:
    from vlp.data.counting import counterfactual

    seed = sample_seed(spec.seed, sample["__key__"], sample.get("_epoch", 0), "counterfactual")
    return counterfactual(sample["text"], random.Random(seed))


def extra_caption_tensors(samples: list[dict], tokenizer, spec: ExtraCaptionSpec) -> dict:
    """The batch fields above for ``samples`` (decoded stream samples with ``text``, ``json``,
    ``__key__``, ``_epoch``)."""
    out = {}
    captions = [s["text"] for s in samples]
    if spec.negatives_k and samples:
        negs = [negatives_for(s, spec, captions[(i + 1) % len(samples)]) for i, s in enumerate(samples)]
        tokens = tokenizer([t for row in negs for t in row])
        out["text_neg"] = tokens.view(len(samples), spec.negatives_k, -1)
    if spec.counterfactuals and samples:
        cfs = [counterfactual_for(s, spec) for s in samples]
        out["text_cf"] = tokenizer([c if c is not None else cap for c, cap in zip(cfs, captions)])
        out["has_cf"] = torch.tensor([c is not None for c in cfs], dtype=torch.bool)
    if spec.pairs:
        out["pair_id"] = torch.tensor([source_pair_id(s) for s in samples], dtype=torch.int64)
    return out


PAIR_ID_LIMIT = 2**40  # JSON pair ids and unit serials below this; epoch and source fill the bits above
EPOCH_WRAP = 2**8  # epochs in an id, modulo this (a batch spans two epochs at most)
PAIR_GROUP_LIMIT = 4  # most samples with one id that make a group: a scene and a counterfactual per kind


def pair_id(sample: dict) -> int:
    """The sample's minimal-pair id: its JSON's integer ``pair`` in [0, PAIR_ID_LIMIT), else -1 (no
    partner)."""
    meta = sample.get("json")
    value = meta.get("pair") if isinstance(meta, dict) else None
    ok = isinstance(value, int) and not isinstance(value, bool) and 0 <= value < PAIR_ID_LIMIT
    return value if ok else -1


def source_pair_id(sample: dict) -> int:
    """The id of the sample's minimal pair or group within a batch, or -1 for none.

    A stream sample carries ``_unit`` (:func:`vlp.data.stream.pair_units`: the serial of its run of
    consecutive samples with one JSON id in its source's epoch stream, -1 for none) and ``_origin``
    (source, epoch, position): the id is unique per (source, epoch, unit), so a JSON id used again
    elsewhere in the data, or by another source, never joins unrelated samples. A sample without
    ``_unit`` uses its JSON id (:func:`pair_id`) as the unit."""
    unit = sample.get("_unit")
    unit = pair_id(sample) if unit is None else unit
    if unit < 0:
        return -1
    source, epoch = sample.get("_origin", (0, 0))[:2]
    return ((source * EPOCH_WRAP + epoch % EPOCH_WRAP) * PAIR_ID_LIMIT) + unit % PAIR_ID_LIMIT
