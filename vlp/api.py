"""The public entry points of the library: ``vlp.load_model``."""

from __future__ import annotations

from pathlib import Path


def load_model(
    path_or_name: str,
    model_name: str | None = None,
    device: str = "cpu",
    pretrained: str | None = None,
    weights: str = "live",
):
    """Load a model for inference.

    ``path_or_name`` is any checkpoint :func:`vlp.checkpoint.kinds` reads (a vlp checkpoint or
    DeepSpeed / FSDP folder, whose architecture is inside; a ``vlp export`` safetensors file; an
    open_clip folder or a Hugging Face ``CLIPModel`` folder; an open_clip weights file with
    ``model_name``), an ``hf-hub:org/repo`` id, or an architecture name: with ``pretrained`` (an
    open_clip tag such as ``openai``, an ``hf-hub:`` id, a folder or a file) its published weights,
    else random init. Tags and hub ids go through the Hugging Face cache (``HF_HUB_OFFLINE``,
    ``HF_HUB_CACHE``). Returns ``(model, preprocess, tokenizer)``: ``model.encode_image(pixels)``
    and ``model.encode_text(token_ids)`` return L2-normalised features, ``preprocess`` maps a PIL
    image to a 3xHxW tensor with the preprocessing the weights prescribe, ``tokenizer(list[str])``
    returns token ids. ``weights="ema"`` loads a training checkpoint's moving average of its weights
    (``train.ema``) instead of the live ones.

    Raises FileNotFoundError (no such file or architecture), CheckpointError (unreadable, unsafe,
    not fitting the architecture, an unknown tag, weights not in the cache while offline, a QuickGELU
    mismatch, a plain weights file without ``model_name``, or ``weights="ema"`` of weights without an EMA).
    """
    from vlp.checkpoint import resolve
    from vlp.checkpoint.kinds import select_weights
    from vlp.checkpoint.published import HUB_PREFIX
    from vlp.checkpoint.storage import is_remote
    from vlp.config import ModelConfig
    from vlp.models.registry import build, build_loaded, eval_preprocess
    from vlp.models.tokenizer import get_tokenizer

    spec = str(path_or_name)
    path = Path(spec).expanduser()
    if pretrained or spec.startswith(HUB_PREFIX):
        _live_only(weights, spec)
        name = model_name or (ModelConfig().name if spec.startswith(HUB_PREFIX) else spec)
        model, mcfg = build(ModelConfig(name=name, pretrained=str(pretrained or spec)))
    elif path.exists() or is_remote(spec):  # a remote checkpoint (s3://...) is downloaded once, verified
        found = select_weights(resolve(spec if is_remote(spec) else path, model_name), weights)
        model, mcfg = build_loaded(found)  # LoRA merged: the plain model, as exported
    elif "/" not in spec and not path.suffix and model_name in (None, spec):
        _live_only(weights, spec)
        model, mcfg = build(spec)  # an architecture name: random weights
    else:
        raise FileNotFoundError(f"checkpoint not found: {path_or_name}")
    model = model.to(device).eval()
    return model, eval_preprocess(model), get_tokenizer(mcfg)


def _live_only(weights: str, spec: str) -> None:
    """Published weights and architectures hold no EMA: asking for one is a one-line error."""
    from vlp.checkpoint import CheckpointError

    if weights != "live":
        raise CheckpointError(f"weights={weights!r}: {spec} is not a training checkpoint, so it holds no EMA weights")
