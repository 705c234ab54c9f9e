"""LiT on a CPU: with both trunks frozen, encode the data once and train only the heads.

A fully locked trunk (``model.vision.lock`` / ``model.text.lock`` with nothing unlocked) is a
fixed function in eval mode, so its output for a sample never changes: the trainer encodes every
training image once (eval transform: no augmentation) and every caption variant once, keeps the
features in memory (N x D_vision + M x D_text floats), and each step runs the projection heads on
a batch of them. The cache is saved under ``<output_dir>/feature_cache/`` keyed by a fingerprint
of the shards and the towers, so a rerun or resume does not encode again.

Batches of cached features come from :class:`CachedBatches`: a seeded permutation per epoch, one
caption variant drawn per sample, and no two identical captions in one global batch (identical
captions are false negatives of each other; a repeat waits for a later batch of the epoch).

Legend: N samples, M captions (all variants), Dv / Dt trunk feature widths.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from vlp.data.decode import SkipCounter, caption_variants, decode_caption
from vlp.data.stream import _shard_samples, caption_norm
from vlp.data.truncation import count_truncated
from vlp.data.usable import NoUsableDataError

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when the encoding of cached features changes


class TrunkEncoder:
    """``encode_image`` / ``encode_text`` returning the frozen trunks' features (before the heads)."""

    def __init__(self, model):
        self.model = model

    def encode_image(self, pixels):
        # the trunk's weights are channels-last (see towers.build_custom): about 2x faster on CPU
        return self.model.visual.trunk(pixels.contiguous(memory_format=torch.channels_last))

    def encode_text(self, tokens):
        text = self.model.text
        mask = (tokens != text.config.pad_token_id).long()
        # trailing padding changes nothing under the attention mask: cut it (captions are short)
        width = max(int(mask.sum(1).max()), 1)
        tokens, mask = tokens[:, :width], mask[:, :width]
        return text.pooler(text.transformer(input_ids=tokens, attention_mask=mask), mask)


class CachedHeads(torch.nn.Module):
    """The trainable part of a model with frozen timm + Hugging Face trunks: ``forward(image
    trunk features, text trunk features)`` gives the model's output dict (normalised features,
    ``logit_scale`` as the multiplier). Shares its parameters with the model."""

    def __init__(self, model):
        super().__init__()
        self.image_head = model.visual.head
        self.text_head = model.text.proj
        self.logit_scale = model.logit_scale
        self.logit_bias = getattr(model, "logit_bias", None)

    def forward(self, image_BDv, text_BDt):
        out = {
            "image_features": F.normalize(self.image_head(image_BDv), dim=-1),
            "text_features": F.normalize(self.text_head(text_BDt), dim=-1),
            "logit_scale": self.logit_scale.exp(),
        }
        if self.logit_bias is not None:
            out["logit_bias"] = self.logit_bias
        return out


def cache_supported(model) -> tuple[bool, str]:
    """Whether ``model`` has fully frozen timm + Hugging Face trunks (the reason if not)."""
    visual, text = model.visual, getattr(model, "text", None)
    if not hasattr(visual, "trunk") or not hasattr(text, "transformer"):
        return False, "needs a timm image tower and a Hugging Face text tower"
    if not getattr(visual.trunk, "_vlp_frozen", False) or not getattr(text.transformer, "_vlp_frozen", False):
        return False, "needs both towers fully locked (model.vision.lock / model.text.lock, nothing unlocked)"
    return True, ""


@dataclass
class FeatureCache:
    image: torch.Tensor  # N x Dv
    text: torch.Tensor  # M x Dt
    first_text: torch.Tensor  # N + 1 offsets: sample i's captions are rows first_text[i]:first_text[i+1]
    captions: list[str]  # M
    keys: list[str]  # N
    skipped: dict[str, int] = field(default_factory=dict)
    truncated_captions: int = 0  # captions longer than the text context, cut when they were encoded

    def __len__(self) -> int:
        return self.image.shape[0]


def read_records(urls: list[str], image_keys, text_key: str, variants_key: str, skips: SkipCounter):
    """Image bytes, caption list and key of every usable sample of ``urls``, in shard order.

    Captions: the JSON ``variants_key`` list if present (and ``variants_key`` set), else ``text_key``.
    Unusable samples are counted in ``skips`` by kind.
    """
    images, captions, keys = [], [], []
    for url in urls:
        for raw in _shard_samples(url, skips):
            where = f"{url}#{raw.get('__key__', '?')}"
            image = next((raw[k] for k in image_keys if k in raw), None)
            if image is None:
                skips.add("missing_image", where)
                continue
            texts = _variants(raw, variants_key, skips, where) if variants_key else None
            if not texts:
                text, problem = decode_caption(raw.get(text_key))
                if problem:
                    skips.add(problem, where)
                    continue
                texts = [text]
            images.append(image)
            captions.append(texts)
            keys.append(str(raw.get("__key__", "")))
    return images, captions, keys


def _variants(raw: dict, key: str, skips: SkipCounter, where: str) -> list[str]:
    if "json" not in raw:
        return []
    try:
        meta = json.loads(raw["json"])
    except ValueError:
        skips.add("bad_json", where)
        return []
    return caption_variants(meta, key)


def fingerprint(urls: list[str], model_cfg: dict, preprocess: str, variants_key: str) -> str:
    """Changes when the shards (path, size, mtime), the towers or the preprocessing change."""
    files = []
    for url in urls:
        st = os.stat(url) if os.path.isfile(url) else None
        files.append([url, st.st_size if st else None, int(st.st_mtime) if st else None])
    blob = json.dumps([CACHE_VERSION, files, model_cfg, preprocess, variants_key], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def build_feature_cache(model, urls, preprocess, tokenizer, env, *, cache_file: Path, data_cfg, batch_size: int,
                        variants_key: str = "", desc: str = "train") -> FeatureCache:  # fmt: skip
    """Encode every sample of ``urls`` with the frozen trunks, or load the cache saved earlier.

    Every rank encodes its share and all get the full cache (see :mod:`vlp.eval.extract`); the main
    rank saves it atomically to ``cache_file``.
    """
    from vlp.checkpoint.writing import atomic_write_bytes
    from vlp.distributed import all_gather_objects, barrier
    from vlp.eval.extract import image_features, text_features

    state = _read_cache(cache_file)
    # every rank must take the same branch (encoding has collectives): use the cache only if all can
    if all(all_gather_objects(state is not None, env)):
        if env.is_main:
            print(f"vlp: {desc} features from the cache {cache_file} ({state['image'].shape[0]} samples)", flush=True)
        return FeatureCache(**state)
    skips = SkipCounter()
    images, captions, keys = read_records(urls, tuple(data_cfg.image_keys), data_cfg.text_key, variants_key, skips)
    if not images:
        raise NoUsableDataError(
            f"no usable training sample in {len(urls)} shard(s) (first: {urls[0]}); skipped: {dict(skips.counts)}; "
            f"check data.image_keys {list(data_cfg.image_keys)} and data.text_key '{data_cfg.text_key}'"
        )
    encoder = TrunkEncoder(model)
    was_training = model.training
    model.eval()
    if env.is_main:
        print(f"vlp: encoding {len(images)} {desc} images with the frozen image trunk (once)", flush=True)
    from vlp.train.data import image_policy

    policy = image_policy(data_cfg)
    img, kept, failed = image_features(
        encoder,
        images,
        preprocess,
        env,
        batch_size=batch_size,
        workers=data_cfg.workers,
        desc=f"{desc} images",
        policy=policy,
    )
    flat = [c for i in kept for c in captions[i]]
    # encoded shortest first, so each batch is cut to a similar length (see TrunkEncoder.encode_text)
    order = sorted(range(len(flat)), key=lambda i: len(flat[i]))
    encoded = text_features(
        encoder, tokenizer, [flat[i] for i in order], env, batch_size=batch_size, desc=f"{desc} captions"
    )
    txt = torch.empty_like(encoded)
    txt[torch.as_tensor(order, dtype=torch.long)] = encoded
    model.train(was_training)
    counts = [len(captions[i]) for i in kept]
    first = torch.zeros(len(kept) + 1, dtype=torch.long)
    first[1:] = torch.cumsum(torch.as_tensor(counts, dtype=torch.long), 0)
    skipped = Counter(skips.counts)
    skipped.update(failed)
    state = {
        "image": img[kept].contiguous(),
        "text": txt,
        "first_text": first,
        "captions": flat,
        "keys": [keys[i] for i in kept],
        "skipped": dict(skipped),
        "truncated_captions": count_truncated(tokenizer, flat, tokenizer(flat)) if flat else 0,
    }
    if env.is_main:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(cache_file, lambda f: torch.save(state, f))
        print(f"vlp: cached {len(kept)} {desc} samples ({len(flat)} captions) in {cache_file}", flush=True)
    barrier(env)
    return FeatureCache(**state)


def _read_cache(path: Path) -> dict | None:
    """The saved cache, or None when there is none or it cannot be read (then it is encoded again)."""
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        FeatureCache(**state)  # every field present
        return state
    except Exception as e:  # noqa: BLE001 - a damaged cache is rebuilt, never trusted
        log.warning("feature cache %s is unreadable (%s): encoding again", path, str(e).splitlines()[0][:200])
        return None


class CachedBatches:
    """Batches ``{"image": B x Dv, "text": B x Dt, "caption": [str]}`` of this rank, forever.

    Epoch ``e``: a permutation and one caption variant per sample drawn from ``(seed, e)``, cut into
    global batches of ``batch_size x world`` samples; rank ``r`` takes rows ``r*B:(r+1)*B`` of each.
    With ``unique``, no global batch holds two samples whose drawn or first captions are equal
    (ignoring case and spacing): such a sample waits for the next batch with room for it, and what
    still waits when the epoch's samples run out is left out of that epoch (counted in
    ``deferred_total`` and logged). The state is (epoch, batch index): a resumed run continues exactly.
    """

    def __init__(self, cache: FeatureCache, batch_size: int, *, rank=0, world=1, seed=0, unique=True, state=None):
        if len(cache) < batch_size * world:
            raise ValueError(
                f"{len(cache)} cached samples cannot fill one global batch of {batch_size} x {world} ranks: "
                "lower data.batch_size"
            )
        self.cache, self.batch_size, self.rank, self.world, self.seed = cache, batch_size, rank, world, seed
        self.unique = unique
        state = state or {}
        self.epoch, self.batch = int(state.get("epoch", 0)), int(state.get("batch", 0))
        self.skipped: Counter = Counter(cache.skipped)  # bad data met while encoding the cache
        self.truncated_captions = cache.truncated_captions  # counted once, when encoded
        self.deferred_total = int(state.get("deferred_total", 0))
        first = cache.first_text.tolist()
        self._primary = [caption_norm(cache.captions[first[i]]) for i in range(len(cache))]

    def _draw(self, epoch: int) -> tuple[list[int], list[int]]:
        """(sample order, caption row of each sample) of ``epoch``."""
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + epoch) & 0x7FFF_FFFF_FFFF)
        n = len(self.cache)
        order = torch.randperm(n, generator=gen).tolist()
        first = self.cache.first_text
        counts = (first[1:] - first[:-1]).tolist()
        pick = torch.rand(n, generator=gen).tolist()
        rows = [int(first[i]) + min(int(pick[i] * counts[i]), counts[i] - 1) for i in range(n)]
        return order, rows

    def _epoch(self, epoch: int) -> list[list[int]]:
        """Global batches of caption-row indices for ``epoch``; sets ``_left_out`` (repeats that
        found no batch, and the incomplete last batch)."""
        order, rows = self._draw(epoch)
        size = self.batch_size * self.world
        if not self.unique:
            self._left_out = (len(order) % size, 0)
            return [[rows[i] for i in order[s : s + size]] for s in range(0, len(order) - size + 1, size)]
        keys = [{self._primary[i], caption_norm(self.cache.captions[rows[i]])} for i in range(len(order))]
        batches, waiting, new = [], [], iter(order)
        while True:
            cur, seen, still = [], set(), []
            for i in waiting:
                if len(cur) < size and seen.isdisjoint(keys[i]):
                    cur.append(i), seen.update(keys[i])
                else:
                    still.append(i)
            waiting = still
            for i in new:
                if not seen.isdisjoint(keys[i]):
                    waiting.append(i)
                    continue
                cur.append(i), seen.update(keys[i])
                if len(cur) == size:
                    break
            if len(cur) < size:
                self._left_out = (len(cur), len(waiting))
                return batches
            batches.append([rows[i] for i in cur])

    def __iter__(self):
        owner = torch.repeat_interleave(
            torch.arange(len(self.cache)), self.cache.first_text[1:] - self.cache.first_text[:-1]
        )
        while True:
            batches = self._epoch(self.epoch)
            if not batches:
                raise RuntimeError("no batch without repeated captions can be formed: lower data.batch_size")
            while self.batch < len(batches):
                rows = batches[self.batch][self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
                self.batch += 1
                rows_t = torch.as_tensor(rows)
                yield {
                    "image": self.cache.image[owner[rows_t]],
                    "text": self.cache.text[rows_t],
                    "caption": [self.cache.captions[r] for r in rows],
                }
            partial, repeats = self._left_out
            self.deferred_total += repeats
            if repeats:
                (log.info if self.epoch == 0 else log.debug)(
                    "epoch %d: %d samples left out: their caption repeats one already in every batch that "
                    "was left (data.unique_captions); %d more did not fill a last batch",
                    self.epoch,
                    repeats,
                    partial,
                )
            self.epoch, self.batch = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch, "deferred_total": self.deferred_total}
