"""Deciding that a reader's data holds nothing usable, so a run stops with one line instead of
reading the same bad shards forever.

Bad samples are skipped and counted (:mod:`vlp.data.decode`); a stream that skips *every* sample
would otherwise loop through its epochs without ever filling a batch. The decision is made on
decoded samples, per reader, and only until the reader's first usable sample (after that the data
has usable samples, and shards are dealt out again every epoch, so a bad stretch always ends):

- **Exact:** the reader has read every shard of every source in full (over as many epochs as that
  takes; shards are dealt out anew each epoch) and not one sample decoded. Nothing in the shard
  set is usable.
- **Bounded:** ``limit`` samples (or empty shards) in a row, from the reader's start, and not one
  usable. This stops a large unusable set (wrong ``data.image_keys``, every image damaged) within
  seconds instead of after a whole pass; ``data.max_unusable_samples`` sets it (0 = no bound).
"""

from __future__ import annotations

from collections import Counter

from vlp.data.shardlists import DataConfigError

MAX_FIELDS_SHOWN = 8


class DataStopError(DataConfigError):
    """The training data cannot give a batch (raised in the process that reads it)."""


class NoUsableDataError(DataStopError):
    """No sample of the shards read so far could be used; the message names shards and skip counts."""


def _shards_text(urls: list[str]) -> str:
    shown = ", ".join(urls[:3])
    return f"{len(urls)} shard(s) ({shown}{', ...' if len(urls) > 3 else ''})"


class UsableGuard:
    """Watches one reader until its first usable sample; raises :class:`NoUsableDataError`.

    ``sources`` are the shard lists of the reader's sources; ``skips`` its
    :class:`vlp.data.decode.SkipCounter` (quoted in the message). The stream calls
    :meth:`usable` / :meth:`unusable` per decoded sample, :meth:`empty_shard` per shard that gave
    no sample and :meth:`epoch_done` when a source's epoch ends.
    """

    def __init__(self, reader: int, sources: list[list[str]], skips, limit: int = 10_000, hint: str = ""):
        self.reader, self.sources, self.skips, self.limit, self.hint = reader, sources, skips, limit, hint
        self.found = False
        self.bad = 0  # samples and empty shards read so far, all unusable
        self.covered: list[set[str]] = [set() for _ in sources]
        self.fields: Counter = Counter()  # member names of the unusable samples

    def usable(self) -> None:
        if not self.found:
            self.found, self.covered, self.fields = True, [], Counter()

    def unusable(self, raw: dict) -> None:
        if self.found:
            return
        if len(self.fields) < MAX_FIELDS_SHOWN:
            self.fields.update(k for k in raw if not k.startswith("_"))
        self._count()

    def empty_shard(self, url: str) -> None:
        if not self.found:
            self._count()

    def _count(self) -> None:
        self.bad += 1
        if self.limit and self.bad >= self.limit:
            raise NoUsableDataError(
                self._message(f"read {self.bad} samples in a row from the start of")
                + f" (if the data really has longer bad stretches, raise data.max_unusable_samples from {self.limit})"
            )

    def epoch_done(self, source: int, shards: list[str], full: bool) -> None:
        """Source ``source`` finished an epoch over ``shards``; ``full``: read from its start."""
        if self.found or not full:
            return
        self.covered[source].update(shards)
        if all(cov >= set(urls) for cov, urls in zip(self.covered, self.sources)):
            raise NoUsableDataError(self._message("read every sample of"))

    def _message(self, what: str) -> str:
        skipped = {k: v for k, v in self.skips.counts.items() if v}
        shards = "; ".join(_shards_text(urls) for urls in self.sources)
        fields = f"; members found: {sorted(self.fields)}" if self.fields else ""
        return (
            f"no usable training sample: reader {self.reader} {what} {shards} and could use none; "
            f"skipped: {skipped or 'nothing (the shards hold no samples)'}{fields}"
            + (f"; {self.hint}" if self.hint else "")
        )
