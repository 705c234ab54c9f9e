"""Feature extraction for evaluation, sharded over ranks and reassembled in the original order.

Rank ``r`` of ``W`` encodes items ``r, r + W, r + 2W, ...``; the features are all-gathered and put
back in order, so every rank ends with the same N x D matrix a single process would compute.
Images that cannot be read are dropped, counted by kind and reported.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from vlp.train.backends import DistEnv, all_gather_objects


def _assemble(parts: list[tuple[list[int], torch.Tensor]], n: int) -> tuple[torch.Tensor, list[int]]:
    """Put each rank's (indices, features) back into one matrix; returns it and the kept indices."""
    dim = next((f.shape[1] for _, f in parts if f.numel()), 0)
    out = torch.zeros(n, dim)
    have = torch.zeros(n, dtype=torch.bool)
    for idx, feats in parts:
        if len(idx):
            out[torch.as_tensor(idx)] = feats.float()
            have[torch.as_tensor(idx)] = True
    kept = torch.nonzero(have).squeeze(1).tolist()
    return out, kept


@torch.no_grad()
def image_features(model, images: list, preprocess, env: DistEnv, *, batch_size=256, workers=0, desc="images"):
    """Encode ``images`` (paths or bytes). Returns ``(features N x D, kept indices, skipped kinds)``;
    rows of unreadable images are zero and absent from ``kept``."""
    from vlp.eval.datasets import ImageList

    dataset = ImageList(images, preprocess)
    mine = Subset(dataset, range(env.rank, len(images), env.world))
    loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=ImageList.collate)
    idx_all, feats_all, failed = [], [], Counter()
    for indices, pixels, bad in tqdm(loader, desc=desc, disable=None if env.is_main else True, leave=False):
        failed.update(kind for _, kind in bad)
        if len(indices):
            idx_all += indices.tolist()
            feats_all.append(model.encode_image(pixels.to(env.device)).float().cpu())
    local = torch.cat(feats_all) if feats_all else torch.zeros(0, 0)
    parts = all_gather_objects((idx_all, local), env)
    counts = Counter()
    for c in all_gather_objects(dict(failed), env):
        counts.update(c)
    feats, kept = _assemble(parts, len(images))
    return feats, kept, dict(counts)


@torch.no_grad()
def text_features(model, tokenizer, texts: list[str], env: DistEnv, *, batch_size=256, desc="texts"):
    """Encode ``texts`` sharded over ranks; returns N x D features in the original order."""
    mine = list(range(env.rank, len(texts), env.world))
    feats = []
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=None if env.is_main else True, leave=False):
        chunk = mine[start : start + batch_size]
        tokens = tokenizer([texts[i] for i in chunk]).to(env.device)
        feats.append(model.encode_text(tokens).float().cpu())
    local = torch.cat(feats) if feats else torch.zeros(0, 0)
    out, _ = _assemble(all_gather_objects((mine, local), env), len(texts))
    return out
