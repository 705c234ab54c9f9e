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

from vlp.distributed import DistEnv, all_gather_objects


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


class _DeviceRows:
    """Feature batches kept where they were computed and copied to the host in large blocks: a
    copy per batch would make the host wait for every batch's encoding (a sync), so reading and
    decoding the next batch could not overlap with it."""

    BLOCK_ROWS = 65536

    def __init__(self):
        self.pending: list[torch.Tensor] = []
        self.host: list[torch.Tensor] = []
        self.rows = 0

    def append(self, feats_BD: torch.Tensor) -> None:
        self.pending.append(feats_BD)
        self.rows += feats_BD.shape[0]
        if self.rows >= self.BLOCK_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            self.host.append(torch.cat(self.pending).cpu())
        self.pending, self.rows = [], 0

    def cat(self) -> torch.Tensor:
        """All rows on the host, in order (0 x 0 when none)."""
        self._flush()
        return torch.cat(self.host) if self.host else torch.zeros(0, 0)


@torch.no_grad()
def image_features(
    model, images: list, preprocess, env: DistEnv, *, batch_size=256, workers=0, desc="images", policy=None
):
    """Encode ``images`` (paths or bytes), made RGB under ``policy`` (:class:`vlp.data.images.ImagePolicy`,
    default: EXIF orientation applied, alpha over white). Returns ``(features N x D, kept indices,
    skipped kinds)``; rows of unreadable images are zero and absent from ``kept``."""
    from vlp.eval.datasets import ImageList

    dataset = ImageList(images, preprocess, policy=policy)
    mine = Subset(dataset, range(env.rank, len(images), env.world))
    cuda = env.device.type == "cuda"
    loader = DataLoader(mine, batch_size=batch_size, num_workers=workers, collate_fn=ImageList.collate, pin_memory=cuda)
    idx_all, feats, failed = [], _DeviceRows(), Counter()
    for indices, pixels, bad in tqdm(loader, desc=desc, disable=None if env.is_main else True, leave=False):
        failed.update(kind for _, kind in bad)
        if len(indices):
            idx_all += indices.tolist()
            feats.append(model.encode_image(pixels.to(env.device, non_blocking=True)).float())
    local = feats.cat()
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
    feats = _DeviceRows()
    for start in tqdm(range(0, len(mine), batch_size), desc=desc, disable=None if env.is_main else True, leave=False):
        chunk = mine[start : start + batch_size]
        tokens = tokenizer([texts[i] for i in chunk]).to(env.device, non_blocking=True)
        feats.append(model.encode_text(tokens).float())
    local = feats.cat()
    out, _ = _assemble(all_gather_objects((mine, local), env), len(texts))
    return out
