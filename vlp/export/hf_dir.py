"""``--format hf``: a transformers ``CLIPModel`` folder that loads offline.

``config.json`` + ``model.safetensors`` (``CLIPModel.from_pretrained(DIR)``), the CLIP BPE as
``vocab.json`` + ``merges.txt`` (``CLIPTokenizer``) and ``preprocessor_config.json``
(``CLIPImageProcessor``: resize the short side, centre crop, the model's mean and std, as vlp's
evaluation transform), so ``CLIPProcessor.from_pretrained(DIR)`` works too. Only open_clip's ViT
CLIPs map (see :mod:`vlp.export.hf_mapping`); anything else is refused before a file is written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from vlp.export import hf_mapping
from vlp.export.errors import ExportError

WEIGHTS_FILE = "model.safetensors"
BICUBIC = 3  # PIL's code, what CLIPImageProcessor stores as `resample`
BILINEAR = 2


def _clip_config(source):
    from transformers import CLIPConfig

    config = CLIPConfig(**hf_mapping.clip_config_kwargs(source.model))
    config.architectures = ["CLIPModel"]
    return config


def validate(source) -> None:
    """Raise ExportError naming everything about ``source`` that ``CLIPModel`` cannot hold, or any
    tensor whose name or shape the mapping gets wrong (checked against a weightless CLIPModel)."""
    from transformers import CLIPModel

    from vlp.export.open_clip_dir import open_clip_config

    reasons = hf_mapping.unsupported(source.model, open_clip_config(source)["model_cfg"], source.name)
    if (getattr(source.model.visual, "preprocess_cfg", None) or {}).get("resize_mode") == "longest":
        reasons.append("resize_mode 'longest' preprocessing (CLIPImageProcessor resizes the shortest side or squashes)")
    if reasons:
        raise ExportError(
            f"'{source.name}' cannot be exported as a Hugging Face CLIPModel: it has " + "; ".join(reasons) + ". "
            "--format open_clip and --format safetensors keep any architecture"
        )
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        expected = {k: tuple(v.shape) for k, v in CLIPModel(_clip_config(source)).state_dict().items()}
    mapped = {k: tuple(v.shape) for k, v in hf_mapping.hf_state_dict(source.model).items()}
    wrong = sorted(k for k in expected.keys() & mapped.keys() if expected[k] != mapped[k])
    missing, extra = sorted(expected.keys() - mapped.keys()), sorted(mapped.keys() - expected.keys())
    if wrong or missing or extra:
        raise ExportError(
            f"mapping '{source.name}' to CLIPModel failed (a vlp bug or an untested option): shapes differ "
            f"{[(k, mapped[k], expected[k]) for k in wrong[:3]]}, missing {missing[:3]}, extra {extra[:3]}"
        )


def left_out(source) -> list[str]:
    """Nothing: :func:`validate` refuses a model with tensors CLIPModel has no place for."""
    return []


def write(source, out: Path) -> list[str]:
    """Write config, weights, tokenizer and image processor files into ``out``; returns their names."""
    from safetensors.torch import save_file
    from transformers import CLIPImageProcessor

    from vlp.export.hf_tokenizer import write_clip_tokenizer_files
    from vlp.export.safetensors_file import plain_tensors
    from vlp.models.registry import context_length, image_size

    _clip_config(source).save_pretrained(str(out))
    save_file(plain_tensors(hf_mapping.hf_state_dict(source.model)), str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    size = image_size(source.model)
    pp = getattr(source.model.visual, "preprocess_cfg", None) or {}
    squash = pp.get("resize_mode", "shortest") == "squash"  # to size x size, no crop
    CLIPImageProcessor(
        do_resize=True,
        size={"height": size, "width": size} if squash else {"shortest_edge": size},
        resample=BILINEAR if pp.get("interpolation") == "bilinear" else BICUBIC,
        do_center_crop=not squash,
        crop_size={"height": size, "width": size},
        do_normalize=True,
        image_mean=list(source.mean),
        image_std=list(source.std),
        do_convert_rgb=True,
    ).save_pretrained(str(out))
    tokenizer_files = write_clip_tokenizer_files(out, context_length(source.model))
    return ["config.json", WEIGHTS_FILE, "preprocessor_config.json", *tokenizer_files]


def load(out: Path):
    """``(CLIPModel, CLIPTokenizer, CLIPImageProcessor)`` from the folder, as transformers loads them
    (weights from safetensors only)."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPTokenizer

    from vlp.models.towers import _quiet_transformers

    with _quiet_transformers():
        model = CLIPModel.from_pretrained(str(out), use_safetensors=True).eval()
        tokenizer = CLIPTokenizer.from_pretrained(str(out))
        image_processor = CLIPImageProcessor.from_pretrained(str(out))
    return model, tokenizer, image_processor


@torch.no_grad()
def hf_features(model, pixels_BCSS: torch.Tensor, text_BL: torch.Tensor) -> dict[str, torch.Tensor]:
    """``CLIPModel``'s projected features and logit-scale multiplier, as :func:`parity.model_features`."""

    def projected(out):  # a tensor up to transformers 4.x, an output whose pooler_output it is in 5.x
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    return {
        "image": projected(model.get_image_features(pixel_values=pixels_BCSS)),
        "text": projected(model.get_text_features(input_ids=text_BL)),
        "logit_scale": model.logit_scale.exp(),
    }


def tokenizer_matches(tokenizer, captions, text_BL: torch.Tensor) -> bool:
    """``CLIPTokenizer`` gives open_clip's ids up to the end-of-text token (padding differs: open_clip
    pads with 0, CLIPTokenizer with end-of-text)."""
    ids = tokenizer(list(captions), padding="max_length", max_length=text_BL.shape[1], truncation=True)["input_ids"]
    for row, theirs in zip(text_BL.tolist(), ids):
        end = row.index(hf_mapping.CLIP_EOS_ID) + 1
        if theirs[:end] != row[:end]:
            return False
    return True


def check(source, out: Path, batch) -> dict:
    """Load the folder with transformers alone; max abs differences against the source on ``batch``
    (a :class:`vlp.export.parity.ParityBatch`), raw projections included, the tokenizer's ids and
    the image processor's normalisation."""
    from vlp.export.parity import compare, summarize

    model, tokenizer, image_processor = load(out)
    diffs = compare(batch.reference, hf_features(model, batch.pixels_BCSS, batch.text_BL), raw=True)
    same_norm = (tuple(image_processor.image_mean), tuple(image_processor.image_std)) == (source.mean, source.std)
    same_ids = tokenizer_matches(tokenizer, batch.captions, batch.text_BL)
    return summarize(diffs, tokenizer_ids_equal=same_ids, preprocess_equal=same_norm)
