"""The public entry points of the library: ``vlp.load_model``."""

from __future__ import annotations

from pathlib import Path


def load_model(path_or_name: str, model_name: str | None = None, device: str = "cpu"):
    """Load a model for inference.

    ``path_or_name`` is any checkpoint :func:`vlp.checkpoint.kinds` reads (a vlp checkpoint or
    DeepSpeed folder, whose architecture is inside; a ``vlp export`` safetensors file; an open_clip
    weights file with ``model_name``), or an architecture name (random init). Returns ``(model,
    preprocess, tokenizer)``: ``model.encode_image(pixels)`` and ``model.encode_text(token_ids)``
    return L2-normalised features, ``preprocess`` maps a PIL image to a 3xHxW tensor,
    ``tokenizer(list[str])`` returns token ids.

    Raises FileNotFoundError (no such file or architecture), CheckpointError (unreadable, unsafe,
    not fitting the architecture, or a plain weights file without ``model_name``).
    """
    from vlp.checkpoint import load_state_dict_checked, resolve
    from vlp.data.transforms import eval_transform
    from vlp.models.registry import build_model, image_size
    from vlp.models.tokenizer import get_tokenizer

    path = Path(path_or_name)
    if path.exists():
        found = resolve(path, model_name)
        name = found.model_cfg
        model, mean, std = build_model(name)
        load_state_dict_checked(model, found.state_dict, path, name.name)
    elif "/" not in str(path_or_name) and not path.suffix and model_name in (None, str(path_or_name)):
        name = str(path_or_name)  # an architecture name: random weights
        model, mean, std = build_model(name)
    else:
        raise FileNotFoundError(f"checkpoint not found: {path_or_name}")
    model = model.to(device).eval()
    return model, eval_transform(image_size(model), mean, std), get_tokenizer(name)
