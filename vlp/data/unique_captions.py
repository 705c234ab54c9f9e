"""Batches of distinct captions (``data.unique_captions``): a sample whose caption is already in the
batch waits for a later one."""

from __future__ import annotations

from collections.abc import Callable, Iterator

from vlp.data.usable import DataStopError


def caption_norm(text: str) -> str:
    """The form in which two captions count as equal: lower case, whitespace collapsed."""
    return " ".join(text.lower().split())


class UniqueBatcher:
    """Fills batches whose captions are distinct, deferring a repeated caption to a later batch.

    Identical captions in one batch are false negatives for the contrastive loss. A deferred sample
    waits, decoded but not augmented, in ``pending`` and goes into the next batch with room for it,
    before any new sample. At most ``batch_size`` wait: beyond that the oldest is dropped and counted
    as ``duplicate_caption``, so data made mostly of one caption cannot hold unbounded memory.
    """

    def __init__(self, batch_size: int, skips, pending: list[dict], watch: list):
        self.batch_size, self.skips, self.pending, self.watch = batch_size, skips, pending, watch
        self._start: list[int] = []

    def fill(self, samples: Iterator[dict], transform: Callable) -> list[dict]:
        """Up to ``batch_size`` transformed samples; fewer only when ``samples`` is exhausted and
        every sample still pending repeats a caption of this batch."""
        batch, captions = [], set()

        def place(sample) -> bool:
            keys = sample["_caption_keys"]
            if not captions.isdisjoint(keys):
                return False
            captions.update(keys)
            batch.append(transform(sample))  # augmented here, so with this batch's random seed
            return True

        waiting, self.pending = self.pending, []
        for sample in waiting:
            if len(batch) == self.batch_size or not place(sample):
                self.pending.append(sample)
        self._start = [r.epoch for r in self.watch]
        while len(batch) < self.batch_size:
            sample = next(samples, None)
            if sample is None:
                break
            if not place(sample):
                self._defer(sample)
        return batch

    def _defer(self, sample: dict) -> None:
        self.pending.append(sample)
        if len(self.pending) <= self.batch_size:
            return
        dropped = self.pending.pop(0)
        self.skips.add("duplicate_caption", dropped["__key__"], dropped["text"])
        if all(r.epoch >= e + 2 for r, e in zip(self.watch, self._start)):
            # a whole epoch went by without completing this batch: it never will
            raise DataStopError(
                f"data.unique_captions: a whole epoch of reader {self.watch[0].reader} holds fewer than "
                f"{self.batch_size} distinct captions; lower data.batch_size or turn unique_captions off"
            )

    def state(self) -> dict:
        return {"pending": [s["_origin"] for s in self.pending], "pending_at": [s.get("_at") for s in self.pending]}
