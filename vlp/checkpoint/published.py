"""Where initial weights come from: what a ``model.pretrained`` / ``--pretrained`` value names.

- an open_clip pretrained tag of the architecture (``openai``, ``laion2b_s34b_b79k``, ``webli``,
  ...): open_clip's table gives the hub repo (or URL), the preprocessing and whether the weights
  were trained with QuickGELU;
- ``hf-hub:org/repo``: an open_clip repo on the Hugging Face hub (``open_clip_config.json`` with
  the architecture and preprocessing, and the weights);
- a local open_clip folder (``open_clip_config.json`` + weights), or a Hugging Face transformers
  ``CLIPModel`` folder (:mod:`vlp.checkpoint.hf_clip`);
- any checkpoint :func:`vlp.checkpoint.kinds.resolve` reads (vlp checkpoints, DeepSpeed and FSDP
  folders, safetensors exports, open_clip weight files).

Downloads go through open_clip's and huggingface_hub's own resolution and cache, so
``HF_HUB_OFFLINE``, ``HF_HOME`` and ``HF_HUB_CACHE`` behave as everywhere else; the files are then
read safely (safetensors, or ``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp.checkpoint import architectures, hf_clip
from vlp.checkpoint.files import CheckpointError, extract_state_dict, read_file

HUB_PREFIX = "hf-hub:"
PREPROCESS_KEYS = ("mean", "std", "interpolation", "resize_mode", "fill_color")
OPEN_CLIP_WEIGHTS = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
)


@dataclass
class Source:
    """What a pretrained value names, before any weight is read.

    ``kind``: "open_clip tag", "hf-hub repo", "open_clip folder", "Hugging Face CLIP folder" or
    "checkpoint" (anything :func:`vlp.checkpoint.kinds.resolve` reads). ``arch``: the registered
    architecture the weights belong to where the source says (a folder or repo: the registered
    name its config equals, else the ``hf-hub:`` / ``local-dir:`` name open_clip resolves).
    ``preprocess``: the image preprocessing the source prescribes (keys of :data:`PREPROCESS_KEYS`).
    ``quick_gelu``: whether the weights were trained with QuickGELU, where the source says.
    """

    spec: str
    kind: str
    arch: str | None = None
    preprocess: dict = field(default_factory=dict)
    quick_gelu: bool | None = None
    where: str = ""
    _read: Callable[[], dict[str, torch.Tensor]] | None = None

    def read(self) -> dict[str, torch.Tensor]:
        """The weights, with open_clip's state-dict keys (downloaded first if need be)."""
        return self._read()


def describe(spec: str, arch: str | None = None) -> Source:
    """What ``spec`` names (see the module docstring); reads configs, not weights.

    Raises:
        CheckpointError: an unknown tag (the message lists the architecture's tags), a folder of
            no known kind, or a hub repo that cannot be fetched (the message says how).
    """
    spec = str(spec)
    if spec.startswith(HUB_PREFIX):
        return _hub_repo(spec, spec[len(HUB_PREFIX) :], arch)
    path = Path(spec).expanduser()
    if path.is_dir() and (path / "open_clip_config.json").is_file():
        return _open_clip_folder(path, arch)
    if path.is_dir() and hf_clip.model_type(path) is not None:
        return _hf_folder(path, arch)
    if path.exists() or os.sep in spec or "/" in spec or path.suffix:
        return Source(spec, "checkpoint", where=str(path))
    if not arch:
        raise CheckpointError(f"pretrained '{spec}': an open_clip tag needs its architecture (model.name / --model)")
    return _tag(spec, arch)


def _tag(tag: str, arch: str) -> Source:
    import open_clip

    cfg = open_clip.get_pretrained_cfg(arch, tag)
    if not cfg:
        tags = open_clip.list_pretrained_tags_by_model(arch)
        known = f"its tags: {', '.join(tags)}" if tags else "it has no published weights in open_clip's table"
        raise CheckpointError(
            f"pretrained '{tag}' is not an open_clip tag of {arch} ({known}), nor a file, folder or hf-hub:org/repo id"
        )
    where = cfg.get("hf_hub", "").rstrip("/") or cfg.get("url", "")
    preprocess = {
        k: tuple(cfg[k]) if isinstance(cfg[k], (list, tuple)) else cfg[k] for k in PREPROCESS_KEYS if k in cfg
    }

    def read() -> dict[str, torch.Tensor]:
        path = _fetch(lambda: open_clip.pretrained.download_pretrained(cfg), f"pretrained '{tag}' of {arch}", where)
        return extract_state_dict(read_file(path))

    return Source(tag, "open_clip tag", arch, preprocess, bool(cfg.get("quick_gelu", False)), where, read)


def _hub_repo(spec: str, repo: str, arch: str | None) -> Source:
    from open_clip.pretrained import download_pretrained_from_hf

    what = f"pretrained '{spec}'"
    config_path = _fetch(lambda: download_pretrained_from_hf(repo, filename="open_clip_config.json"), what, repo)
    config = _read_json(Path(config_path))
    model_cfg = config.get("model_cfg", config)
    name = architectures.matching_name(model_cfg, prefer=arch or "") or spec

    def read() -> dict[str, torch.Tensor]:
        return extract_state_dict(read_file(_fetch(lambda: download_pretrained_from_hf(repo), what, repo)))

    return Source(spec, "hf-hub repo", name, _preprocess_of(config), None, repo, read)


def _open_clip_folder(path: Path, arch: str | None) -> Source:
    config = _read_json(path / "open_clip_config.json")
    model_cfg = config.get("model_cfg", config)
    name = architectures.matching_name(model_cfg, prefer=arch or "") or f"local-dir:{path.resolve()}"
    weights = next((path / n for n in OPEN_CLIP_WEIGHTS if (path / n).is_file()), None)
    if weights is None:
        raise CheckpointError(
            f"{path}: an open_clip folder without weights (expected one of {', '.join(OPEN_CLIP_WEIGHTS)})"
        )
    return Source(
        str(path), "open_clip folder", name, _preprocess_of(config), None, str(path),
        lambda: extract_state_dict(read_file(weights)),
    )  # fmt: skip


def _hf_folder(path: Path, arch: str | None) -> Source:
    kind = hf_clip.model_type(path)
    if kind != "clip":
        raise CheckpointError(
            f"{path}: a transformers '{kind}' folder; vlp maps CLIPModel folders (model_type 'clip') onto open_clip. "
            "For SigLIP use the open_clip repo of the same weights (e.g. hf-hub:timm/ViT-B-16-SigLIP)"
        )
    model_cfg = hf_clip.architecture(path)
    name = architectures.matching_name(model_cfg, prefer=arch or "")
    if name is None:
        raise CheckpointError(
            f"{path}: no registered open_clip architecture builds this CLIPModel ({_closest(model_cfg)}); "
            "add a JSON model config with these sizes (see vlp/models/configs/) or open_clip.add_model_config"
        )
    return Source(
        str(path), "Hugging Face CLIP folder", name, hf_clip.preprocess(path), model_cfg["quick_gelu"], str(path),
        lambda: hf_clip.read_weights(path),
    )  # fmt: skip


def _closest(model_cfg: dict) -> str:
    best = None
    for name in architectures.names():
        own = architectures.config_of(name)
        if not own or "timm_model_name" in own.get("vision_cfg", {}) or "hf_model_name" in own.get("text_cfg", {}):
            continue
        diff = architectures.differences(own, model_cfg)
        if best is None or len(diff) < len(best[1]):
            best = name, diff
    return f"closest: {best[0]}, which differs in {'; '.join(best[1][:4])}" if best else "none is close"


def _preprocess_of(config: dict) -> dict:
    pp = config.get("preprocess_cfg") or {}
    return {k: tuple(pp[k]) if isinstance(pp[k], (list, tuple)) else pp[k] for k in PREPROCESS_KEYS if k in pp}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not a readable JSON config ({e})") from None


def _fetch(download: Callable[[], str], what: str, repo: str) -> str:
    """Run an open_clip / huggingface_hub download; a miss becomes one line saying how to get it."""
    from huggingface_hub import constants

    try:
        return download()
    except Exception as e:  # noqa: BLE001 - the hub raises many kinds; each becomes the same advice
        cache = constants.HF_HUB_CACHE
        offline = constants.HF_HUB_OFFLINE
        reason = (
            "is not in the Hugging Face cache and HF_HUB_OFFLINE=1"
            if offline
            else f"could not be downloaded ({_first_line(e)})"
        )
        fetch = (
            f"on a machine with internet run `hf download {repo} --cache-dir {cache}` and copy that folder here"
            if not repo.startswith(("http://", "https://"))
            else f"download {repo} and pass the file as pretrained"
        )
        raise CheckpointError(f"{what}: {repo} {reason} (cache: {cache}); {fetch}") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[-1] if text else ''}"[:300]
