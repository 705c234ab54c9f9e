"""vlp: vision-language pretraining on WebDataset shards.

The library parts (models, losses, tokenization, transforms, metrics) import without
webdataset or DeepSpeed; the training application lazily imports what it needs.
"""

from vlp._version import __version__


def load_model(path_or_name, model_name=None, device="cpu", pretrained=None, weights="live"):
    """Load a model for inference: a checkpoint, folder or ``hf-hub:`` id, or an architecture with
    ``pretrained`` weights (an open_clip tag such as ``openai``); ``weights="ema"``: a training
    checkpoint's moving average of its weights; see :func:`vlp.api.load_model`."""
    from vlp.api import load_model as _load_model

    return _load_model(path_or_name, model_name=model_name, device=device, pretrained=pretrained, weights=weights)


__all__ = ["__version__", "load_model"]
