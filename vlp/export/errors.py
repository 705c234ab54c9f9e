"""The one error type of ``vlp export``."""

from __future__ import annotations


class ExportError(ValueError):
    """A source, format or output folder that cannot be exported; raised before anything is written
    (except where said), with a message naming what is unsupported and what to do instead."""
