"""open_clip's ViT CLIP as transformers' ``CLIPModel``: what maps, the config, the weights.

``CLIPModel`` is OpenAI's CLIP: a ViT that pools its class token and a causal text transformer
that pools the end-of-text token, both with plain pre-norm blocks. open_clip's ``VisionTransformer``
and ``TextTransformer`` (fused into ``CLIP`` or as ``CustomTextCLIP.text``) are the same network
when built with their default options, so the weights map one to one:

    open_clip                                    transformers CLIPModel
    visual.class_embedding                       vision_model.embeddings.class_embedding
    visual.conv1.weight                          vision_model.embeddings.patch_embedding.weight
    visual.positional_embedding                  vision_model.embeddings.position_embedding.weight
    visual.ln_pre / ln_post                      vision_model.pre_layrnorm / post_layernorm
    <tower>.resblocks.i.ln_1 / ln_2              <tower>.encoder.layers.i.layer_norm1 / layer_norm2
    <tower>.resblocks.i.attn.in_proj_*           <tower>.encoder.layers.i.self_attn.{q,k,v}_proj.* (split in 3)
    <tower>.resblocks.i.attn.out_proj            <tower>.encoder.layers.i.self_attn.out_proj
    <tower>.resblocks.i.mlp.c_fc / c_proj        <tower>.encoder.layers.i.mlp.fc1 / fc2
    visual.proj (W x D)                          visual_projection.weight (D x W, transposed)
    [text.]token_embedding / positional_embedding  text_model.embeddings.token_embedding / position_embedding
    [text.]ln_final                              text_model.final_layer_norm
    [text.]text_projection (W x D)               text_projection.weight (transposed)
    logit_scale                                  logit_scale

Every other option changes the network and is refused by :func:`unsupported` before anything is
written. Text pooling: open_clip's default takes the position of the largest token id, which with
the CLIP BPE (ids < 49408) is the first end-of-text token 49407; ``CLIPModel`` with
``eos_token_id: 49407`` takes the first 49407, the same token for every tokenized caption.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vlp.export.errors import ExportError

CLIP_VOCAB_SIZE, CLIP_BOS_ID, CLIP_EOS_ID = 49408, 49406, 49407
LEGACY_ARGMAX_EOS_ID = 2  # transformers pools by argmax of the ids when eos_token_id is 2 (old configs)


@dataclass
class TextParts:
    """The text tower of an open_clip CLIP, wherever its modules live (``prefix`` in the state dict)."""

    prefix: str
    transformer: nn.Module
    token_embedding: nn.Embedding
    positional_embedding: torch.Tensor
    ln_final: nn.Module
    text_projection: object
    pool_type: str
    eos_id: int | None
    causal: bool
    cls_emb: object


def text_parts(model: nn.Module) -> TextParts | None:
    """``CLIP`` keeps its text tower's modules on itself; ``CustomTextCLIP`` under ``text``. None
    when the text tower is not open_clip's ``TextTransformer`` (e.g. a Hugging Face model)."""
    from open_clip.transformer import TextTransformer

    text = getattr(model, "text", None)
    if text is not None:
        if not isinstance(text, TextTransformer):
            return None
        owner, prefix, pool, eos = text, "text.", text.pool_type, text.eos_id
    else:
        owner, prefix, pool, eos = model, "", model.text_pool_type, getattr(model, "text_eos_id", None)
    return TextParts(
        prefix=prefix,
        transformer=owner.transformer,
        token_embedding=owner.token_embedding,
        positional_embedding=owner.positional_embedding,
        ln_final=owner.ln_final,
        text_projection=owner.text_projection,
        pool_type=pool,
        eos_id=eos,
        causal=owner.attn_mask is not None,
        cls_emb=getattr(owner, "cls_emb", None),
    )


def hidden_act(module: nn.Module) -> str | None:
    """transformers' name of an MLP activation, None if it has none."""
    from open_clip.transformer import QuickGELU

    if isinstance(module, QuickGELU):
        return "quick_gelu"
    if isinstance(module, nn.GELU):
        return {"none": "gelu", "tanh": "gelu_pytorch_tanh"}.get(module.approximate)
    return None


def unsupported(model: nn.Module, model_cfg: dict, name: str) -> list[str]:
    """Why ``model`` (open_clip architecture dict ``model_cfg``, called ``name``) cannot be a
    ``CLIPModel``; empty when it can."""
    if hasattr(model, "text_decoder"):
        return ["CoCa (a multimodal text decoder and attentional pooling; CLIPModel has neither)"]
    reasons = _vision_reasons(model.visual)
    text = text_parts(model)
    if text is None:
        kind = type(model.text).__name__
        reasons.append(f"a {kind} text tower (e.g. a Hugging Face model); CLIPModel's is open_clip's TextTransformer")
    else:
        reasons += _text_reasons(text, model_cfg.get("text_cfg", {}), name)
    if getattr(model, "logit_bias", None) is not None:
        reasons.append("a logit bias (sigmoid / SigLIP loss); CLIPModel has none, so its logits would differ")
    if not reasons and model.visual.proj.shape[1] != _text_dim(text):
        widths = (model.visual.proj.shape[1], _text_dim(text))
        reasons.append(f"image and text embeddings of different widths {widths}; CLIPModel has one projection_dim")
    return reasons


def _vision_reasons(visual: nn.Module) -> list[str]:
    from open_clip.transformer import VisionTransformer

    kind = type(visual).__name__
    if kind == "ModifiedResNet":
        return ["a ResNet image tower (ModifiedResNet, e.g. RN50); CLIPModel's image tower is a ViT"]
    if kind == "TimmModel":
        return ["a timm image tower (TimmModel); CLIPModel's image tower is open_clip's VisionTransformer"]
    if not isinstance(visual, VisionTransformer):
        return [f"a {kind} image tower; CLIPModel's image tower is open_clip's VisionTransformer"]
    reasons = []
    if visual.attn_pool is not None:
        reasons.append("attentional pooling in the image tower (attentional_pool)")
    elif visual.pool_type != "tok":
        reasons.append(f"image pooling '{visual.pool_type}' (no class-token pooling; CLIPModel pools the class token)")
    if isinstance(visual.ln_pre, nn.Identity):
        reasons.append("no LayerNorm before the image transformer (no_ln_pre)")
    if visual.proj is None:
        reasons.append("no image projection")
    if visual.image_size[0] != visual.image_size[1] or visual.patch_size[0] != visual.patch_size[1]:
        reasons.append(f"non-square images or patches ({visual.image_size}, {visual.patch_size})")
    return reasons + _block_reasons(visual.transformer, "image", visual)


def _text_reasons(text: TextParts, text_cfg: dict, name: str) -> list[str]:
    reasons = []
    if text.cls_emb is not None:
        reasons.append("a text class token (embed_cls)")
    if not text.causal:
        reasons.append("bidirectional text attention (no_causal_mask); CLIPModel's text transformer is causal")
    if text.pool_type not in ("argmax", "eos") or (text.pool_type == "eos" and text.eos_id == LEGACY_ARGMAX_EOS_ID):
        reasons.append(f"text pooling '{text.pool_type}' (CLIPModel pools the end-of-text token)")
    if text.text_projection is None:
        reasons.append("no text projection")
    elif isinstance(text.text_projection, nn.Linear) and text.text_projection.bias is not None:
        reasons.append("a text projection with a bias (proj_bias)")
    vocab = text.token_embedding.num_embeddings
    if text_cfg.get("hf_tokenizer_name") or text_cfg.get("tokenizer_kwargs") or "siglip" in name.lower():
        reasons.append("a tokenizer other than open_clip's CLIP BPE (the one written as vocab.json + merges.txt)")
    elif vocab != CLIP_VOCAB_SIZE:
        reasons.append(f"a text vocabulary of {vocab} tokens (the CLIP BPE tokenizer has {CLIP_VOCAB_SIZE})")
    return reasons + _block_reasons(text.transformer, "text", text.transformer, text.ln_final)


def _block_reasons(transformer: nn.Module, tower: str, *norm_owners: nn.Module) -> list[str]:
    blocks = list(transformer.resblocks)
    if any(type(b).__name__ != "ResidualAttentionBlock" for b in blocks):
        return [f"custom attention blocks in the {tower} tower (qk_norm, scaled cosine attention or scale_* options)"]
    reasons = []
    if any(not isinstance(b.ls_1, nn.Identity) or not isinstance(b.ls_2, nn.Identity) for b in blocks):
        reasons.append(f"layer scale in the {tower} tower (ls_init_value)")
    acts = {hidden_act(b.mlp.gelu) for b in blocks}
    if None in acts or len(acts) != 1:
        found = sorted({type(b.mlp.gelu).__name__ for b in blocks})
        reasons.append(f"{tower} tower activation {found}; CLIPModel supports GELU (exact or tanh) and QuickGELU")
    eps = {m.eps for owner in norm_owners for m in owner.modules() if isinstance(m, nn.LayerNorm)}
    if len(eps) > 1:
        reasons.append(f"{tower} tower LayerNorms with different eps {sorted(eps)}; CLIPModel has one per tower")
    shapes = {(b.attn.num_heads, b.mlp.c_fc.out_features) for b in blocks}
    if len(shapes) > 1:
        reasons.append(f"{tower} tower layers of different head counts or MLP widths")
    return reasons


def _text_dim(text: TextParts) -> int:
    proj = text.text_projection
    return proj.out_features if isinstance(proj, nn.Linear) else proj.shape[1]


def _tower_config(transformer: nn.Module, norm_owner: nn.Module, dim: int) -> dict:
    block = transformer.resblocks[0]
    return {
        "hidden_size": block.ln_1.normalized_shape[0],
        "intermediate_size": block.mlp.c_fc.out_features,
        "num_hidden_layers": len(transformer.resblocks),
        "num_attention_heads": block.attn.num_heads,
        "hidden_act": hidden_act(block.mlp.gelu),
        "layer_norm_eps": next(m.eps for m in norm_owner.modules() if isinstance(m, nn.LayerNorm)),
        "projection_dim": dim,
    }


def clip_config_kwargs(model: nn.Module) -> dict:
    """Keyword arguments of transformers' ``CLIPConfig`` for a model :func:`unsupported` accepts."""
    visual, text = model.visual, text_parts(model)
    dim = visual.proj.shape[1]
    vision = _tower_config(visual.transformer, visual, dim)
    vision.update(num_channels=3, image_size=int(visual.image_size[0]), patch_size=int(visual.patch_size[0]))
    text_config = _tower_config(text.transformer, text.transformer, dim)
    text_config.update(
        vocab_size=text.token_embedding.num_embeddings,
        max_position_embeddings=text.positional_embedding.shape[0],
        bos_token_id=CLIP_BOS_ID,
        eos_token_id=CLIP_EOS_ID if text.pool_type == "argmax" else int(text.eos_id),
        pad_token_id=CLIP_EOS_ID,  # the tokenizer pads with end-of-text (pooling takes the first one)
    )
    return {
        "vision_config": vision,
        "text_config": text_config,
        "projection_dim": dim,
        "logit_scale_init_value": float(model.logit_scale.detach().reshape(())),
    }


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``CLIPModel``'s state dict from an open_clip CLIP (views; see the table at the top).

    Raises ExportError naming the model's tensors the mapping leaves unused: a sign of an option
    :func:`unsupported` does not know, which would otherwise be silently dropped.
    """
    sd, used, out = model.state_dict(), set(), {}

    def take(key: str) -> torch.Tensor:
        used.add(key)
        return sd[key]

    def copy_weight_bias(dst: str, src: str) -> None:  # LayerNorm or Linear: same layout in both
        out[f"{dst}.weight"], out[f"{dst}.bias"] = take(f"{src}.weight"), take(f"{src}.bias")

    def copy_blocks(dst: str, src: str, count: int) -> None:
        for i in range(count):
            d, s = f"{dst}.{i}", f"{src}.{i}"
            # nn.MultiheadAttention stacks the query, key and value projections in one matrix, in that order
            for kind in ("weight", "bias"):
                for part, tensor in zip("qkv", take(f"{s}.attn.in_proj_{kind}").chunk(3)):
                    out[f"{d}.self_attn.{part}_proj.{kind}"] = tensor
            for hf, oc in (("self_attn.out_proj", "attn.out_proj"), ("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")):
                copy_weight_bias(f"{d}.{hf}", f"{s}.{oc}")
            copy_weight_bias(f"{d}.layer_norm1", f"{s}.ln_1")
            copy_weight_bias(f"{d}.layer_norm2", f"{s}.ln_2")

    out["vision_model.embeddings.class_embedding"] = take("visual.class_embedding")
    out["vision_model.embeddings.patch_embedding.weight"] = take("visual.conv1.weight")
    out["vision_model.embeddings.position_embedding.weight"] = take("visual.positional_embedding")
    copy_weight_bias("vision_model.pre_layrnorm", "visual.ln_pre")
    copy_blocks("vision_model.encoder.layers", "visual.transformer.resblocks", len(model.visual.transformer.resblocks))
    copy_weight_bias("vision_model.post_layernorm", "visual.ln_post")
    out["visual_projection.weight"] = take("visual.proj").t()

    text = text_parts(model)
    t = text.prefix
    out["text_model.embeddings.token_embedding.weight"] = take(f"{t}token_embedding.weight")
    out["text_model.embeddings.position_embedding.weight"] = take(f"{t}positional_embedding")
    copy_blocks("text_model.encoder.layers", f"{t}transformer.resblocks", len(text.transformer.resblocks))
    copy_weight_bias("text_model.final_layer_norm", f"{t}ln_final")
    if isinstance(text.text_projection, nn.Linear):
        out["text_projection.weight"] = take(f"{t}text_projection.weight")
    else:
        out["text_projection.weight"] = take(f"{t}text_projection").t()
    out["logit_scale"] = take("logit_scale").reshape(())

    left = sorted(set(sd) - used)
    if left:
        raise ExportError(f"{len(left)} tensors have no place in CLIPModel (e.g. {left[:4]}): an unsupported option")
    return out
