"""Converters from real, offline datasets to vlp's layouts.

- :func:`write_openclipart_shards` (``vlp.data.sources.openclipart``): OpenClipart SVGs ->
  train/val/heldout WebDataset shards with captions from the RDF metadata.
- :func:`write_fashion_mnist` (``vlp.data.sources.fashion_mnist``): Fashion-MNIST idx files ->
  the ImageFolder layout of zero-shot classification.

The names are imported lazily: converter worker processes import ``vlp.data.sources.svg``
and must not pay for webdataset (and torch) on start-up.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "write_openclipart_shards": "vlp.data.sources.openclipart",
    "write_fashion_mnist": "vlp.data.sources.fashion_mnist",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
