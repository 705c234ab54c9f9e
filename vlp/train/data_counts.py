"""What the training data did, summed over ranks: samples skipped by kind, captions cut to the
model's context, and (``loss.pair_weight``) how many rows had a minimal-pair partner."""

from __future__ import annotations

import torch

from vlp.data.decode import SKIP_KINDS


class DataCounts:
    """Counters read from the training loader; :meth:`totals` is a collective in multi-process runs."""

    def __init__(self, env, pair_weight: float, cached: bool):
        self.env, self.pair_weight, self.cached = env, pair_weight, cached
        self.paired = [0, 0]  # this rank's rows with a partner, and all rows
        self.warned_unpaired = False

    def totals(self, loader) -> tuple[dict[str, int], int]:
        """``({kind: skipped samples}, truncated captions)`` over every rank (each holds its readers' counts)."""
        values = [loader.skipped.get(k, 0) for k in SKIP_KINDS] + [getattr(loader, "truncated_captions", 0)]
        counts = torch.tensor(values, dtype=torch.long)
        if self.env.world > 1 and not self.cached:  # every rank holds the whole cache's counts
            torch.distributed.all_reduce(counts, group=self.env.group)
        *skipped, truncated = counts.tolist()
        return {k: int(v) for k, v in zip(SKIP_KINDS, skipped) if v}, int(truncated)

    def count_pairs(self, micro_batches) -> None:
        """Rows in a minimal pair or group (loss.pair_weight), so a run whose shards have none says so."""
        if not self.pair_weight:
            return
        from vlp.losses.hard_negatives import pair_groups

        for b in micro_batches:
            ids = b.get("pair_id")
            if ids is not None:
                self.paired[0] += int(pair_groups(ids)[1].sum())
                self.paired[1] += len(ids)

    def metrics(self, loader) -> dict:
        """The ``data/...`` records of a logged step."""
        skipped, truncated = self.totals(loader)
        out = {f"data/skipped/{k}": v for k, v in skipped.items()}
        if truncated:
            out["data/truncated_captions"] = truncated
        for source, n in getattr(loader, "negative_sources", {}).items():
            out[f"data/negatives/{source}"] = n
        if getattr(loader, "deferred_total", 0):  # cached features: repeats left out of epochs
            out["data/left_out_repeats"] = loader.deferred_total
        if self.pair_weight and self.paired[1]:
            self._warn_unpaired()
            out["data/paired_fraction"] = self.paired[0] / self.paired[1]
        return out

    def _warn_unpaired(self) -> None:
        if self.paired[0] or not self.env.is_main or self.warned_unpaired:
            return
        self.warned_unpaired = True
        print(
            "vlp: warning: loss.pair_weight is set but no training sample so far had a partner: the shards need "
            "the same integer 'pair' in two adjacent samples' JSON (vlp shards --synthetic --counterfactual-pairs)",
            flush=True,
        )
