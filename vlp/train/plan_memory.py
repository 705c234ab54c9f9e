"""Memory per device of a planned run (``vlp train --dry-run``), from the architecture alone.

The model is built on the ``meta`` device (shapes, no storage, no weights read or downloaded) to
count its parameters; the towers' widths, depths and token counts come from the architecture's
config. Every term is a leading-order estimate with its formula, so a plan can be checked by
hand (``tests/test_recipes.py`` does) and compared with a measured peak (``tools/gpu_check.py``).

Legend: P = parameters, Pt = trainable parameters, W = world size, B = micro-batch per process,
k = accumulation steps, R = k*B rows of the loss per process, N = columns of the loss (the
gathered batch), D = embedding width, s = tokens, w = width, L = layers, r = MLP ratio.
"""

from __future__ import annotations

import dataclasses
import logging

GIB = 2**30
# per-direction factor of fp32 R x N matrices alive at the peak of a dense loss (logits, their
# softmax and its gradient): tools/bench/loss.py measured 4.1-5.1 matrices for both directions
# of vlp's gather on CPU and budgets 5.5 for them
DENSE_MATRICES = 5.5
OPEN_CLIP_DENSE_MATRICES = 4.5  # the same measurement for open_clip's ClipLoss
TILE_MATRICES = 3  # a tile's logits, its exponentials and its gradient in the tiled backward
SIGLIP_MATRICES = 3  # logits, log-sigmoid, gradient

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Tower:
    """A transformer tower's activation shape: ``tokens`` per sample, ``width``, ``layers``."""

    name: str
    tokens: int
    width: int
    layers: int
    mlp_ratio: float = 4.0


@dataclasses.dataclass
class ModelShape:
    params: int | None
    trainable: int | None
    embed_dim: int
    image_size: int
    towers: list[Tower]
    block_params: int = 0  # the largest transformer block (FSDP gathers one at a time)
    root_params: int = 0  # parameters outside the blocks (FSDP's root unit)
    by_tower: dict = dataclasses.field(default_factory=dict)
    notes: list[str] = dataclasses.field(default_factory=list)


def _meta_model(mcfg):
    """The architecture of ``mcfg`` on the meta device: no storage, no weights read."""
    import torch

    from vlp.models.registry import build

    bare = dataclasses.replace(
        mcfg,
        pretrained="",
        vision=dataclasses.replace(mcfg.vision, weights=""),
        text=dataclasses.replace(mcfg.text, pretrained=False),
    )
    with torch.device("meta"):
        return build(bare, device="meta")[0]


def _count(model) -> tuple[int, int, int, int, dict]:
    blocks, largest = 0, 0
    for name, module in model.named_modules():
        if name.endswith("resblocks"):
            for block in module:
                n = sum(p.numel() for p in block.parameters())
                blocks, largest = blocks + n, max(largest, n)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    by_tower = {"image": sum(p.numel() for p in model.visual.parameters())}
    by_tower["text and the rest"] = total - by_tower["image"]
    return total, trainable, largest, total - blocks, by_tower


def _towers(mcfg, arch: dict | None) -> tuple[list[Tower], list[str]]:
    """The plain open_clip transformer towers of the architecture (others are not estimated)."""
    if arch is None:
        return [], ["activations not estimated: a custom architecture"]
    towers, notes = [], []
    v, t = arch.get("vision_cfg", {}), arch.get("text_cfg", {})
    plain_vit = isinstance(v.get("layers"), int) and not v.get("timm_model_name") and not mcfg.vision.timm_model_name
    if plain_vit:
        grid = (v["image_size"] // v["patch_size"]) ** 2
        kept = grid - int(grid * mcfg.patch_dropout)  # FLIP drops patch tokens in training
        towers.append(Tower("image", 1 + kept, v["width"], v["layers"], v.get("mlp_ratio", 4.0)))
    else:
        notes.append("image tower activations not estimated (not an open_clip ViT)")
    if not t.get("hf_model_name") and not mcfg.text.hf_model_name_or_path and "width" in t:
        towers.append(Tower("text", t.get("context_length", 77), t["width"], t["layers"], t.get("mlp_ratio", 4.0)))
    else:
        notes.append("text tower activations not estimated (a Hugging Face tower)")
    if "multimodal_cfg" in arch:
        notes.append("CoCa's multimodal decoder and its vocabulary logits are not estimated")
    return towers, notes


def model_shape(mcfg) -> ModelShape:
    """Parameter counts (meta device) and tower shapes of ``mcfg``."""
    from vlp.models.registry import get_model_config

    arch = get_model_config(mcfg.name) if mcfg.name != "custom" else None
    towers, notes = _towers(mcfg, arch)
    size = (arch or {}).get("vision_cfg", {}).get("image_size", mcfg.vision.image_size or 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    embed = mcfg.embed_dim or (arch or {}).get("embed_dim", 0)
    try:
        params, trainable, block, root, by_tower = _count(_meta_model(mcfg))
    except Exception as e:  # a tower that cannot be built without its files: the plan goes on without it
        log.debug("meta build failed", exc_info=True)
        notes.append(f"parameters not counted: the model could not be built on the meta device ({e})")
        return ModelShape(None, None, embed, size, towers, notes=notes)
    return ModelShape(params, trainable, embed, size, towers, block, root, by_tower, notes)


def ema_decay(train_cfg) -> float:
    """``train.ema.decay`` where the config tree has it (0 = no moving average of the weights)."""
    return float(getattr(getattr(train_cfg, "ema", None), "decay", 0.0) or 0.0)


def _term(name: str, nbytes: float, how: str) -> dict:
    return {"name": name, "bytes": int(nbytes), "gib": round(nbytes / GIB, 3), "how": how}


def tower_activation_bytes(tower: Tower, batch: int, precision: str, checkpointing: bool) -> tuple[float, str]:
    """Saved activations of one tower's forward for the backward, and the formula used.

    Per layer, fused attention (no s x s scores kept), no dropout: the inputs of the QKV, output,
    fc1 and fc2 projections, Q, K and V, the GELU input (r*w wide, as is fc2's input) and the two
    LayerNorm inputs: (8 + 2r) values of s*B*w. In 16-bit autocast the matmul inputs are 16-bit
    and the LayerNorm inputs (the residual stream) fp32: (20 + 4r) bytes; in fp32 4*(8 + 2r).
    With gradient checkpointing each layer keeps its fp32 input and one layer is recomputed.
    """
    r, sbw = tower.mlp_ratio, tower.tokens * batch * tower.width
    per_value = 20 + 4 * r if precision in ("bf16", "fp16") else 4 * (8 + 2 * r)
    shape = f"s {tower.tokens} x B {batch} x w {tower.width}"
    if checkpointing:
        return (
            tower.layers * 4 + per_value
        ) * sbw, f"({tower.layers} layers x 4 B + 1 layer x {per_value:g} B) x {shape}"
    return tower.layers * per_value * sbw, f"{tower.layers} layers x {per_value:g} B x {shape}"


def _gathered(nbytes: int, shape: ModelShape) -> str:
    return f"{nbytes} B x (root {shape.root_params:,} + 2 blocks x {shape.block_params:,})"


def _state_terms(shape: ModelShape, backend: str, stage: int, precision: str, world: int) -> list[dict]:
    """Weights, gradients, optimizer state and transient copies under the training backend."""
    P, Pt, W = shape.params, shape.trainable, world
    half = precision in ("bf16", "fp16")
    terms = []
    if backend == "deepspeed":
        wb = 2 if half else 4
        shard_w, shard_g, shard_o = stage >= 3, stage >= 2, stage >= 1
        opt = 12 if half else 8  # (fp32 master copy +) two AdamW moments
        terms.append(_term(f"weights ({'16-bit' if half else 'fp32'})", wb * P / (W if shard_w else 1),
                           f"{wb} B x P{' / W' if shard_w else ''}"))  # fmt: skip
        terms.append(_term(f"gradients ({'16-bit' if half else 'fp32'})", wb * Pt / (W if shard_g else 1),
                           f"{wb} B x Pt{' / W' if shard_g else ''}"))  # fmt: skip
        terms.append(_term("AdamW state" + (" + fp32 master weights" if half else ""), opt * Pt / (W if shard_o else 1),
                           f"{opt} B x Pt{' / W' if shard_o else ''}"))  # fmt: skip
        if stage >= 3:
            live = wb * (shape.root_params + 2 * shape.block_params)
            terms.append(_term("gathered weights (ZeRO-3, transient)", live, _gathered(wb, shape)))
        return terms
    if backend == "fsdp":
        terms.append(_term("weights (fp32 shards)", 4 * P / W, "4 B x P / W"))
        terms.append(_term("gradients (fp32 shards)", 4 * Pt / W, "4 B x Pt / W"))
        terms.append(_term("AdamW state (2 x fp32 shards)", 8 * Pt / W, "8 B x Pt / W"))
        wb = 2 if precision == "bf16" else 4
        live = wb * (shape.root_params + 2 * shape.block_params)
        terms.append(_term("gathered weights (FSDP, transient)", live, _gathered(wb, shape)))
        return terms
    terms.append(_term("weights (fp32)", 4 * P, "4 B x P"))
    terms.append(_term("gradients (fp32)", 4 * Pt, "4 B x Pt"))
    if backend == "ddp":
        terms.append(_term("DDP gradient buckets", 4 * Pt, "4 B x Pt (gradient_as_bucket_view off)"))
    terms.append(_term("AdamW state (2 x fp32)", 8 * Pt, "8 B x Pt"))
    if half:
        terms.append(_term("16-bit weight copies (autocast cache)", 2 * P, "2 B x P, kept for the backward"))
    return terms


def _loss_terms(cfg, world: int, embed: int) -> tuple[list[dict], dict]:
    """The contrastive loss at R = k*B rows per process: its logits and gathered features."""
    c, B, k = cfg.loss.contrastive, cfg.data.batch_size, cfg.train.accum_steps
    R, D, K = k * B, embed, cfg.data.negatives.k
    N = R * world
    terms = []
    if c.type == "siglip":
        cols = R if c.impl == "ring" else N
        terms.append(_term(f"loss logits (siglip {c.impl})", SIGLIP_MATRICES * 4 * R * cols,
                           f"{SIGLIP_MATRICES} x 4 B x R {R} x {cols}"))  # fmt: skip
        terms.append(_term("gathered text features", 2 * 4 * N * D, f"2 x 4 B x N {N} x D {D}"))
    else:
        group = (c.group_size or world) if c.impl == "grouped" else world
        N = R * group
        i2t = N * (1 + K) if K and not c.own_negatives else N + K
        if c.impl == "tiled":
            t = min(c.tile_size, max(R, N))
            terms.append(_term(f"loss tiles (tiled, T={c.tile_size})", TILE_MATRICES * 4 * t * t,
                               f"{TILE_MATRICES} x 4 B x {t} x {t}"))  # fmt: skip
            terms.append(_term("gathered features + column gradient", 3 * 4 * N * D + K * 4 * N * D,
                               f"(3 + K) x 4 B x N {N} x D {D}"))  # fmt: skip
        else:
            factor = DENSE_MATRICES / 2
            terms.append(_term(f"loss logits ({c.impl}, {R} x {N})", factor * 4 * R * (i2t + N),
                               f"{factor:g} x 4 B x R {R} x (i2t {i2t} + t2i {N} columns)"))  # fmt: skip
            terms.append(_term("gathered features + their gradients", 2 * 2 * 4 * N * D + 2 * K * 4 * N * D,
                               f"(4 + 2K) x 4 B x N {N} x D {D}"))  # fmt: skip
    if k > 1:
        terms.append(_term("accumulation feature cache", 6 * 4 * R * D, f"6 x 4 B x k*B {R} x D {D}"))
    everyone = R * world
    reference = {
        "open_clip_clip_loss_bytes": int(OPEN_CLIP_DENSE_MATRICES * 4 * everyone**2),
        "how": f"open_clip's ClipLoss without local_loss: {OPEN_CLIP_DENSE_MATRICES:g} x 4 B x N^2, N = {everyone}",
    }
    return terms, reference


def estimate(cfg, shape: ModelShape, world: int, backend: str) -> dict:
    """Memory per device, term by term, with the assumptions; ``bytes`` are per process."""
    p, B = cfg.model.precision, cfg.data.batch_size
    assumptions = [
        "leading-order terms only: no CUDA context, allocator fragmentation or data-loader memory (add ~1-3 GiB)",
        "activations: fused attention (no s x s scores kept), no dropout, the formula of each tower line",
        f"loss in fp32 (vlp casts the features up); dense logits: {DENSE_MATRICES:g} R x N matrices over both "
        "directions, as tools/bench/loss.py measured",
        "AdamW keeps two fp32 moments per trainable parameter; DeepSpeed 16-bit adds an fp32 master copy",
    ]
    if shape.params is None:
        return {"terms": [], "total_bytes": None, "total_gib": None, "assumptions": assumptions + shape.notes}
    stage = cfg.train.deepspeed.zero_stage
    terms = _state_terms(shape, backend, stage, p, world)
    if backend == "deepspeed" or backend == "fsdp":
        assumptions.append(f"{backend}: parameters, gradients and optimizer state sharded as listed over W = {world}")
    from vlp.train.teacher import needs_teacher

    if needs_teacher(cfg.loss):
        terms.append(_term("momentum teacher (fp32 copy)", 4 * shape.params, "4 B x P"))
    if ema_decay(cfg.train):
        terms.append(_term("EMA weights (fp32 copy)", 4 * shape.trainable, "4 B x Pt (train.ema)"))
    for tower in shape.towers:
        nbytes, how = tower_activation_bytes(tower, B, p, cfg.model.grad_checkpointing)
        terms.append(_term(f"activations, {tower.name} tower", nbytes, how))
    size = shape.image_size
    act = 2 if p in ("bf16", "fp16") else 4
    terms.append(_term("input images", B * 3 * size * size * (1 + 4 + act),
                       f"B {B} x 3 x {size}^2 x (1 uint8 + 4 normalised + {act} conv input)"))  # fmt: skip
    loss_terms, reference = _loss_terms(cfg, world, shape.embed_dim)
    terms += loss_terms
    total = sum(t["bytes"] for t in terms)
    return {
        "terms": terms,
        "total_bytes": total,
        "total_gib": round(total / GIB, 2),
        "reference": reference,
        "assumptions": assumptions + shape.notes,
    }
