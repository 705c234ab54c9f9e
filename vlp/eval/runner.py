"""Evaluate a model on ``data.val_shards`` with the tasks of ``cfg.eval`` (used in training)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from vlp.data.shardlists import expand_urls
from vlp.data.stream import StreamLoader, StreamSpec
from vlp.data.tokenizer import get_tokenizer
from vlp.data.transforms import eval_transform
from vlp.eval.features import extract_features
from vlp.eval.registry import get_task
from vlp.models.registry import image_size

log = logging.getLogger(__name__)


def shard_info(urls: list[str]) -> dict:
    """The ``_info.json`` written by ``vlp shards`` beside the first shard, if any."""
    f = Path(urls[0]).parent / "_info.json"
    return json.loads(f.read_text()) if f.is_file() else {}


def eval_loader(urls, cfg, mean, std, model) -> StreamLoader:
    from vlp.train.data import decode_options

    spec = StreamSpec(
        sources=[urls],
        batch_size=cfg.eval.batch_size,
        seed=0,
        infinite=False,
        shuffle_buffer=0,
        decode=decode_options(cfg.data),
    )
    transform = eval_transform(image_size(model), mean, std)
    return StreamLoader(spec, transform, get_tokenizer(cfg.model.name), min(cfg.data.workers, len(urls)))


def evaluate(model, cfg, mean, std, device="cpu") -> dict:
    """Run every task of ``cfg.eval.tasks``; returns ``{"<task>/<metric>": value}``."""
    urls = [u for p in cfg.data.val_shards for u in expand_urls(p, "data.val_shards")]
    info = shard_info(urls)
    settings = {
        "classnames": cfg.eval.classnames or info.get("classnames"),
        "templates": cfg.eval.templates or info.get("templates"),
    }
    was_training = model.training
    feats = extract_features(model, eval_loader(urls, cfg, mean, std, model), device, cfg.eval.max_samples)
    tokenizer = get_tokenizer(cfg.model.name)
    results = {}
    for task in cfg.eval.tasks:
        for k, v in get_task(task)(model, tokenizer, feats, settings, device).items():
            results[f"{task}/{k}"] = v
    for kind, n in feats.skipped.items():
        results[f"data/skipped/{kind}"] = n
    model.train(was_training)
    return results
