"""vlp: vision-language pretraining on WebDataset shards.

The library parts (models, losses, tokenization, transforms, metrics) import without
webdataset or DeepSpeed; the training application lazily imports what it needs.
"""

__version__ = "0.1.0"


def load_model(path_or_name, model_name=None, device="cpu"):
    """Load a model for inference; see :func:`vlp.models.loading.load_model`."""
    from vlp.models.loading import load_model as _load_model

    return _load_model(path_or_name, model_name=model_name, device=device)


__all__ = ["__version__", "load_model"]
