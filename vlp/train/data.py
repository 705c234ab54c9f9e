"""Builds the training stream from ``cfg.data`` for this rank, from a saved position if any."""

from __future__ import annotations

import logging

from vlp.data.decode import DecodeOptions
from vlp.data.extra_captions import ExtraCaptionSpec
from vlp.data.images import ImagePolicy
from vlp.data.shardlists import DataConfigError, check_readers, expand_urls, read_sizes
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.transforms import draft_min_side, train_transform
from vlp.models.registry import image_size
from vlp.models.tokenizer import get_tokenizer

log = logging.getLogger(__name__)


def train_sources(data_cfg) -> list[list[str]]:
    if not data_cfg.train_shards:
        raise DataConfigError("data.train_shards is empty: give shard patterns (write some with `vlp shards`)")
    return [expand_urls(p, "data.train_shards") for p in data_cfg.train_shards]


def samples_per_epoch(data_cfg) -> int | None:
    if data_cfg.samples_per_epoch > 0:
        return data_cfg.samples_per_epoch
    sizes = [read_sizes(urls) for urls in train_sources(data_cfg)]
    return None if any(s is None for s in sizes) else sum(sizes)


def resolve_total_steps(cfg, world: int) -> int:
    """``train.steps``, or ``train.epochs`` x samples per epoch / global batch."""
    if cfg.train.epochs <= 0:
        return cfg.train.steps
    n = samples_per_epoch(cfg.data)
    if not n:
        raise DataConfigError(
            "train.epochs needs the epoch length: set data.samples_per_epoch or put sizes.json beside the shards"
        )
    global_batch = cfg.data.batch_size * world * cfg.train.accum_steps
    return max(1, round(cfg.train.epochs * n / global_batch))


def image_policy(data_cfg) -> ImagePolicy:
    """How ``data_cfg`` turns every image into RGB (EXIF orientation, alpha background, size guard)."""
    return ImagePolicy.from_options(data_cfg.exif_transpose, data_cfg.alpha_background, data_cfg.max_image_pixels)


def decode_options(data_cfg, draft_min_side: int = 0) -> DecodeOptions:
    return DecodeOptions(
        tuple(data_cfg.image_keys),
        data_cfg.text_key,
        data_cfg.max_image_pixels,
        draft_min_side,
        image_policy=image_policy(data_cfg),
    )


def build_train_loader(cfg, model, env, state=None) -> StreamLoader:
    """The training stream: batches with uint8 ``image`` (normalise with ``DeviceNormalize``)."""
    d = cfg.data
    size = image_size(model)
    sources = train_sources(d)
    for urls in sources:
        check_readers(urls, env.world, d.workers, d.resampled, "data.train_shards")
    spec = StreamSpec(
        sources=sources,
        batch_size=d.batch_size,
        weights=list(d.train_weights),
        seed=cfg.train.seed,
        rank=env.rank,
        world=env.world,
        resampled=d.resampled,
        shuffle_buffer=d.shuffle_buffer,
        decode=decode_options(d, draft_min_side(size, d.train_crop_scale) if d.jpeg_draft else 0),
        caption_variants_key=d.caption_variants_key,
        unique_captions=d.unique_captions,
        max_unusable=d.max_unusable_samples,
        extras=ExtraCaptionSpec(
            negatives_k=d.negatives.k,
            negatives_field=d.negatives.field,
            negatives_online=d.negatives.online,
            negatives_types=tuple(d.negatives.types),
            counterfactuals=d.counterfactuals,
            pairs=cfg.loss.pair_weight > 0,
            seed=cfg.train.seed,
        ),
    )
    transform = train_transform(size, d.train_crop_scale, d.train_resize)
    return StreamLoader(spec, transform, get_tokenizer(cfg.model), d.workers, state)
