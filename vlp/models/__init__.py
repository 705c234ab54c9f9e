"""Models: architectures as data (open_clip's configs plus vlp's own), single-device modules."""

from vlp.models.registry import build_model, get_model_config, list_models

__all__ = ["build_model", "get_model_config", "list_models"]
