"""The configuration tree: one dataclass per section, each field with its default and its help
text (``docs/configuration.md`` is generated from them: :mod:`vlp.config.docs`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal


class ConfigError(ValueError):
    """A configuration problem found before any work starts."""


def _f(default, help: str, **kw):
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help}, **kw)
    return field(default=default, metadata={"help": help}, **kw)


@dataclass
class VisionTowerConfig:
    timm_model_name: str = _f(
        "", "A timm model as the image tower (e.g. `efficientnet_lite0`), replacing the architecture's ('' = keep)."
    )
    weights: str = _f("", "Local weights file of the timm trunk (ImageNet-pretrained etc.; '' = random init).")
    weights_match: Literal["names", "order"] = _f(
        "names",
        "Map `weights` onto the trunk by key `names`, or by `order` (same tensors in the same order under other "
        "names, e.g. an EfficientNet-PyTorch file for timm); every shape is checked either way.",
    )
    pool: str = _f("avg", "timm global pooling of the trunk (`avg`, `max`, ...).")
    proj: Literal["linear", "mlp"] = _f("linear", "Projection head from the trunk's features to `model.embed_dim`.")
    mean: list[float] = _f([], "Image normalisation mean (empty = the tower's: timm's pretrained config).")
    std: list[float] = _f([], "Image normalisation std (empty = the tower's).")
    image_size: int = _f(0, "Input resolution of the timm tower (0 = its pretrained config's).")
    lock: bool = _f(False, "Freeze the image trunk (LiT); the projection head still trains.")
    unlocked_groups: int = _f(0, "With `lock`: leave the last N layer groups of the trunk trainable.")
    freeze_bn_stats: bool = _f(True, "With `lock`: also freeze the locked layers' batch-norm statistics.")


@dataclass
class TextTowerConfig:
    hf_model_name_or_path: str = _f(
        "", "A Hugging Face model folder (or hub name, needs internet) as the text tower ('' = keep the arch's)."
    )
    pretrained: bool = _f(True, "Load the Hugging Face weights (false: the architecture with random weights).")
    pooler: Literal["mean_pooler", "cls_pooler", "cls_last_hidden_state_pooler", "max_pooler"] = _f(
        "mean_pooler", "How token states become one text feature."
    )
    proj: Literal["linear", "mlp"] = _f("linear", "Projection head from the pooled feature to `model.embed_dim`.")
    context_length: int = _f(77, "Tokens per caption of the Hugging Face tokenizer (longer captions are cut).")
    lock: bool = _f(False, "Freeze the text transformer; the projection head still trains.")
    unlocked_layers: int = _f(0, "With `lock`: leave the last N transformer layers trainable.")
    freeze_layer_norm: bool = _f(True, "With `lock`: freeze the LayerNorms of the locked layers too.")


@dataclass
class LoraConfig:
    rank: int = _f(
        0,
        "Rank r of the LoRA adapters (peft) on the layers named by `targets` (0 = off). With r > 0 every base "
        "weight is frozen: only the adapters (and the logit scale, see `train_logit_scale`) train.",
    )
    alpha: float = _f(16.0, "LoRA alpha: an adapter's update is scaled by alpha / rank.")
    dropout: float = _f(
        0.0,
        "Dropout on the input of the adapters of linear layers (`c_fc`, `c_proj`); the attention adapters are "
        "added to the weights for the forward, where input dropout cannot apply.",
    )
    targets: list[str] = _f(
        ["attn", "c_fc", "c_proj"],
        "Layers that get adapters, by name or dotted name suffix (peft's `target_modules`): `attn`, each "
        "transformer block's `nn.MultiheadAttention` (peft adapts its packed q/k/v projection and its output "
        "projection together; `out_proj` alone would never be called), `c_fc` / `c_proj`, the MLP's linear "
        "layers, in both towers. Other towers (timm, Hugging Face) name theirs differently (e.g. `qkv`, `fc1`, "
        "`query`): a name that matches no linear or attention layer is an error listing the model's names.",
    )
    train_logit_scale: bool = _f(True, "Also train the logit scale (and a SigLIP logit bias) besides the adapters.")


@dataclass
class PreprocessConfig:
    mean: list[float] = _f(
        [], "Image normalisation mean (empty = the pretrained weights' own, else the architecture's)."
    )
    std: list[float] = _f([], "Image normalisation std (empty = the pretrained weights' own, else the architecture's).")
    interpolation: Literal["", "bicubic", "bilinear"] = _f(
        "", "Resampling filter of the evaluation resize ('' = the weights' own, else bicubic)."
    )
    resize_mode: Literal["", "shortest", "longest", "squash"] = _f(
        "",
        "Evaluation resize: `shortest` side to the input size then centre crop (OpenAI's), `squash` to a square "
        "ignoring the aspect ratio (SigLIP's), `longest` side then pad ('' = the weights' own, else shortest).",
    )


@dataclass
class ModelConfig:
    name: str = _f(
        "debug",
        "Architecture: an open_clip model name (`ViT-B-32`, `RN50`, ...) or a vlp one; `custom` = both towers "
        "from `model.vision` / `model.text`.",
    )
    pretrained: str = _f(
        "",
        "Initial weights ('' = random): an open_clip tag of `name` (`openai`, `laion2b_s34b_b79k`, ...), "
        "`hf-hub:org/repo`, an open_clip folder or file, a Hugging Face `CLIPModel` folder, or a vlp checkpoint. "
        "Tags and hub repos go through the Hugging Face cache (`HF_HUB_OFFLINE`, `HF_HUB_CACHE`); see "
        "docs/pretrained.md. Their preprocessing fills `model.preprocess`.",
    )
    force_quick_gelu: bool = _f(
        False,
        "Build `name` with QuickGELU activations (open_clip's `force_quick_gelu`): for weights trained with "
        "them on an architecture that has no `-quickgelu` variant.",
    )
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    precision: Literal["fp32", "bf16", "fp16"] = _f("fp32", "Autocast precision of the forward pass.")
    embed_dim: int = _f(0, "Joint embedding width (0 = the architecture's; required for `custom`).")
    vision: VisionTowerConfig = field(default_factory=VisionTowerConfig)
    text: TextTowerConfig = field(default_factory=TextTowerConfig)
    itm_head: bool = _f(
        False,
        "CoCa only: an image-text matching head on the multimodal decoder, trained on in-batch hard "
        "negatives (loss.itm_weight).",
    )
    cache_features: Literal["auto", "off"] = _f(
        "auto",
        "`auto`: when both towers are fully locked, encode the training set once and train the heads on the "
        "cached features (no image augmentation); `off`: always run the towers.",
    )
    grad_checkpointing: bool = _f(
        False,
        "Recompute each transformer block's activations in the backward instead of storing them (open_clip's "
        "`set_grad_checkpointing`): less activation memory for one more forward (steps 8-13% slower on CPU).",
    )
    patch_dropout: float = _f(
        0.0,
        "FLIP: fraction of image patch tokens dropped at random in training (0.5-0.75 in the paper; ViT image "
        "towers of open_clip only; 0.5 made a ViT-B-32 step 1.2x faster on CPU); evaluation sees every patch.",
    )
    channels_last: bool = _f(
        False,
        "Store convolution weights channels-last (NHWC): convolutional image towers ran ~10% faster on CPU "
        "(RN50); a ViT's single patchify convolution gains nothing measurable.",
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class NegativesDataConfig:
    k: int = _f(0, "Hard-negative captions per sample in each batch (`text_neg`, B x K; 0 = none).")
    field: str = _f("hard_negatives", "JSON field of the shards holding negatives (`vlp negatives` writes it).")
    online: bool = _f(True, "Generate rule-based negatives on the fly for samples whose shards have fewer than k.")
    types: list[str] = _f(
        ["replace_object", "replace_attribute", "replace_relation", "swap_objects", "swap_attributes"],
        "Negative types the online generator may use (see `vlp negatives --help`).",
    )


@dataclass
class DataConfig:
    train_shards: list[str] = _f([], "Training shard patterns (brace-expanded, e.g. `d/shapes-{000000..000009}.tar`).")
    train_weights: list[float] = _f([], "Sampling weight of each `train_shards` entry (empty = equal).")
    val_shards: list[str] = _f([], "Held-out shard patterns for evaluation.")
    batch_size: int = _f(64, "Per-process batch size (global batch = batch_size x world size x accum_steps).")
    workers: int = _f(2, "DataLoader worker processes per rank (0 = load in the training process).")
    resampled: bool = _f(False, "Draw shards with replacement (seeded per rank/worker/epoch) instead of splitting.")
    shuffle_buffer: int = _f(1000, "Sample shuffle buffer size per worker (0 = no sample shuffle).")
    samples_per_epoch: int = _f(
        0, "Epoch length in samples for `train.epochs` (0 = sum of the shards' sizes.json entries)."
    )
    train_crop_scale: list[float] = _f([0.9, 1.0], "RandomResizedCrop scale range for training images.")
    train_resize: Literal["torch", "pil"] = _f(
        "torch",
        "Resize of the training crop: `torch` (uint8 SIMD bicubic with antialias, within 2/255 of Pillow's pixels, "
        "99% equal; several times faster) or `pil` (Pillow's, the same pixels as open_clip's training transform).",
    )
    jpeg_draft: bool = _f(
        True,
        "Decode training JPEGs at 1/2, 1/4 or 1/8 scale when every random crop still keeps at least the "
        "model's input size in pixels (faster; see docs/data.md). false: always decode at full size.",
    )
    max_image_pixels: int = _f(
        50_000_000, "Images with more pixels are skipped and counted (decompression-bomb guard)."
    )
    exif_transpose: bool = _f(
        True,
        "Turn images upright by their EXIF orientation (phone photos), in training and evaluation alike. "
        "false: the pixels as stored, as open_clip reads them.",
    )
    alpha_background: str = _f(
        "white",
        "Colour transparent images are composited on: a name, #rrggbb or r,g,b; `none` drops the alpha channel "
        "(open_clip's pixels).",
    )
    image_keys: list[str] = _f(["jpg", "jpeg", "png", "webp"], "Sample fields tried for the image, in order.")
    max_unusable_samples: int = _f(
        10_000,
        "A reader that skips this many samples in a row before its first usable one stops the run with an error "
        "naming the shards and the skip counts (0 = only when every shard was read in full; see docs/data.md).",
    )
    text_key: str = _f("txt", "Sample field holding the caption.")
    caption_variants_key: str = _f(
        "",
        "Field of the sample's JSON holding alternative captions, one of which replaces the caption each "
        "epoch ('' = off).",
    )
    unique_captions: bool = _f(
        False, "Keep equal captions (ignoring case and spacing) out of the same per-rank training batch."
    )

    negatives: NegativesDataConfig = field(default_factory=NegativesDataConfig)
    counterfactuals: bool = _f(
        False,
        "Attach a counting counterfactual to every sample whose caption has exactly one count in 2..10 "
        "(the same caption with another count; vlp.data.counting) for the counting loss.",
    )


@dataclass
class ContrastiveConfig:
    weight: float = _f(1.0, "Weight of the contrastive term in the objective.")
    type: Literal["clip", "siglip"] = _f(
        "clip", "`clip`: softmax InfoNCE; `siglip`: pairwise sigmoid (needs an architecture with a logit bias)."
    )
    impl: Literal["gather", "tiled", "grouped", "ring"] = _f(
        "gather",
        "clip: `gather` (B x N logits), `tiled` (streamed, O(tile^2) logits), `grouped` (gather within "
        "`group_size` ranks); siglip: `gather` or `ring` (one B x B block at a time).",
    )
    tile_size: int = _f(1024, "Rows/columns per tile of the `tiled` implementation.")
    group_size: int = _f(0, "Ranks per contrastive group of `grouped` (0 = all ranks); must divide the world size.")
    label_smoothing: float = _f(0.0, "Label smoothing of the cross-entropy targets (clip).")
    dcl: bool = _f(False, "Decoupled contrastive loss: the positive is left out of the denominator (clip).")
    own_negatives: bool = _f(
        False, "Hard negatives only against their own image (default: every image sees every negative)."
    )


@dataclass
class HardNegativesLossConfig:
    columns: bool = _f(True, "NegCLIP: the batch's hard negatives are extra image->text contrastive columns.")
    image_grounded_weight: float = _f(
        0.0, "DeGLA image-grounded contrast: each image against its caption and its own K negatives (0 = off)."
    )
    text_grounded_weight: float = _f(
        0.0,
        "DeGLA text-grounded contrast: each caption against the EMA teacher's embedding of it and its own K "
        "negatives (needs the momentum teacher: loss.distill.momentum; 0 = off).",
    )
    text_grounded_scale: float = _f(10.0, "Fixed logit scale of the text-grounded contrast (DeGLA: 10).")


@dataclass
class DistillConfig:
    enabled: bool = _f(
        False,
        "ALBEF momentum distillation: an EMA teacher's similarities soften the contrastive targets and its "
        "queued features are extra negatives (replaces the plain contrastive term; clip type, gather impl).",
    )
    momentum: float = _f(0.995, "EMA momentum m of the teacher: teacher = m * teacher + (1 - m) * model, every step.")
    queue_size: int = _f(65536, "Queued teacher features per modality K; must be a multiple of the global batch.")
    alpha: float = _f(0.4, "Weight of the teacher's soft targets after the warm-up (ALBEF: 0.4).")
    alpha_warmup_steps: int = _f(
        -1, "Steps of the linear warm-up of alpha from 0 (-1 = one epoch of data.samples_per_epoch; 0 = none)."
    )


@dataclass
class LossConfig:
    contrastive: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    caption_weight: float = _f(
        2.0, "Weight of the captioning cross-entropy of CoCa models (teacher forcing, padding ignored; 0 = off)."
    )
    itm_weight: float = _f(1.0, "Weight of the image-text matching loss of a model with `model.itm_head`.")
    counting_weight: float = _f(
        1.0, "Weight lambda of the counting loss on samples with a counterfactual (data.counterfactuals)."
    )
    pair_weight: float = _f(
        0.0,
        "Minimal-pair loss (0 = off): two to four samples of a batch whose JSON has the same `pair` (vlp shards "
        "--synthetic --counterfactual-pairs, --every-kind for groups) are contrasted, each image against its caption "
        "and the other members', each caption against its image and the other members'. The sample shuffle buffer "
        "moves each pair or group (adjacent samples with the same id) as one unit, so its members stay side by side.",
    )
    negatives: HardNegativesLossConfig = field(default_factory=HardNegativesLossConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    align_weight: float = _f(0.0, "Weight of the alignment regulariser mean ||x_i - y_i||^2 (0 = off).")
    uniform_weight: float = _f(0.0, "Weight of the uniformity regulariser on both towers (0 = off).")
    uniform_t: float = _f(2.0, "Temperature t of the uniformity kernel exp(-t ||x_i - x_j||^2).")


@dataclass
class DeepSpeedConfig:
    zero_stage: int = _f(1, "ZeRO stage with `train.backend=deepspeed`: 0 (plain data parallel), 1, 2 or 3.")
    config: str = _f(
        "",
        "A DeepSpeed JSON (e.g. configs/deepspeed/zero2.json) merged into the one vlp generates; a key that "
        "contradicts vlp's config (batch, accumulation, clipping, precision, stage, optimizer) is an error.",
    )


@dataclass
class EMAConfig:
    decay: float = _f(
        0.0,
        "Decay d of an exponential moving average of the trainable weights, kept in fp32 beside them: "
        "ema = d * ema + (1 - d) * weights after each update (e.g. 0.9999; 0 = off). Saved in checkpoints, "
        "evaluated beside the live weights (`eval_ema/...`), exported with `vlp export --weights ema` "
        "(docs/cloud.md).",
    )
    warmup: int = _f(
        0,
        "Optimizer steps before the EMA starts: at step `warmup` it is set to the weights, then averaged "
        "(0 = it starts from the initial weights).",
    )
    every: int = _f(
        1, "Average at every N-th optimizer step (the multiples of N after `warmup`); `decay` applies per update."
    )


@dataclass
class WandbConfig:
    project: str = _f("", "W&B project ('' = `WANDB_PROJECT`, else `vlp`).")
    entity: str = _f("", "W&B team or user that owns the project ('' = `WANDB_ENTITY`, else your default).")
    name: str = _f("", "Display name of the W&B run ('' = the last part of `train.output_dir`).")
    group: str = _f("", "W&B group of the run, e.g. an ablation's name ('' = none).")
    tags: list[str] = _f([], "Tags of the W&B run.")
    mode: Literal["", "online", "offline"] = _f(
        "",
        "`online`: upload while training; `offline`: only the run files under `<output_dir>/wandb` (or "
        "`WANDB_DIR`), uploaded later with `wandb sync` ('' = `WANDB_MODE`, else online).",
    )


@dataclass
class TrainConfig:
    steps: int = _f(1000, "Optimizer steps to run (ignored when `epochs` > 0).")
    epochs: float = _f(0.0, "If > 0, run this many epochs of `data.samples_per_epoch` instead of `steps`.")
    lr: float = _f(5e-4, "Peak learning rate.")
    weight_decay: float = _f(0.1, "AdamW weight decay (not applied to gains, biases, logit scale).")
    betas: list[float] = _f([0.9, 0.98], "AdamW betas.")
    eps: float = _f(1e-6, "AdamW epsilon.")
    warmup_steps: int = _f(100, "Linear warm-up steps before the cosine decay.")
    min_lr_ratio: float = _f(0.0, "Final learning rate as a fraction of `lr`.")
    grad_clip: float = _f(1.0, "Clip the global gradient norm to this value (0 = off).")
    accum_steps: int = _f(
        1,
        "Micro-batches per optimizer step; the contrastive loss spans all of them (exact, cached features).",
    )
    logit_scale_max: float = _f(100.0, "Upper clamp of the learned logit scale (as the multiplier).")
    backend: Literal["auto", "single", "ddp", "deepspeed", "fsdp"] = _f(
        "auto",
        "`auto`: DDP when launched with several processes (torchrun/SLURM), else one; `single`; `ddp`; "
        "`deepspeed` (ZeRO, see `train.deepspeed`); `fsdp` (torch's FSDP2 `fully_shard`: parameters, gradients "
        "and optimizer state sharded over the processes).",
    )
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    dist_timeout_s: int = _f(1800, "Timeout of collective operations in seconds (a dead rank fails the others).")
    compile: bool = _f(
        False,
        "`torch.compile` the training forward (not with DeepSpeed). The first step compiles (25 s for `debug`, "
        "100 s for ViT-B-32 on CPU); on CPU steps were then 1.18x (debug) and 0.90x (ViT-B-32) as fast: "
        "measure on your device with `tools/bench/train_step.py --compile --vs-base`.",
    )
    max_bad_steps: int = _f(
        10,
        "Steps with a non-finite loss or gradient norm are skipped and counted; this many in a row stop the run "
        "naming the last good checkpoint (0 = no check, which saves one host-device sync per step).",
    )
    output_dir: str = _f(
        "runs/default",
        "Run folder: config, metrics.jsonl, TensorBoard, checkpoints. A local path or any fsspec URL "
        "(`s3://bucket/run`, `gs://...`): a remote run is written to `staging_dir` first and uploaded after each "
        "checkpoint (docs/cloud.md).",
    )
    staging_dir: str = _f(
        "",
        "With a remote `output_dir`: the local folder the run is written to before upload ('' = "
        "~/.cache/vlp/staging/<name>-<hash>, or under $VLP_CACHE). Keep it on a disk with room for two checkpoints.",
    )
    seed: int = _f(0, "Seed of the model init, data order and augmentation.")
    checkpoint_every: int = _f(500, "Write a checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = _f(3, "Keep the newest N step checkpoints.")
    log_every: int = _f(10, "Log loss and throughput every N steps.")
    report_to: list[Literal["tensorboard", "wandb"]] = _f(
        ["tensorboard"],
        "Where the metrics go besides `metrics.jsonl` (always written): `tensorboard` (`<output_dir>/tensorboard`), "
        "`wandb` (Weights & Biases, see `train.wandb`; `pip install 'vlp[wandb]'`); `[]` = metrics.jsonl only. "
        "Only the main rank logs; a resumed run continues its W&B run.",
    )
    wandb: WandbConfig = field(default_factory=WandbConfig)
    eval_every: int = _f(0, "Run the eval tasks every N steps (0 = only at the end).")
    val_every: int = _f(
        0,
        "Every N steps, measure retrieval on `data.val_shards` (mean of R@1/5/10 both ways) and keep the best "
        "weights; the run ends with the best (0 = off).",
    )
    early_stopping_patience: int = _f(
        0, "With `val_every`: stop after this many validations without improvement (0 = never stop early)."
    )
    resume: str = _f("", "`latest` or a checkpoint path or URL to resume from ('' = start fresh).")
    overwrite: bool = _f(
        False,
        "Start fresh in an output_dir that holds another run's checkpoints, deleting them, its metrics.jsonl and "
        "TensorBoard files first (otherwise such a start is refused; see docs/reliability.md).",
    )
    device: str = _f("auto", "`auto` (cuda if available), `cpu` or `cuda`.")
    progress: Literal["auto", "on", "off"] = _f("auto", "tqdm progress bar (`auto` = when stderr is a terminal).")


@dataclass
class EvalConfig:
    tasks: list[str] = _f(
        ["zeroshot_classification", "zeroshot_retrieval"],
        "Eval tasks, by name or alias (`vlp eval --help` lists the registered ones).",
    )
    data: list[str] = _f([], "Data of each eval task, in the order of `tasks` (empty = `data.val_shards`).")
    batch_size: int = _f(256, "Batch size of feature extraction.")
    classnames: list[str] = _f([], "Class names for zero-shot (empty = from the data: folders or _info.json).")
    templates: list[str] = _f([], "Prompt templates with `{c}` (empty = from the data, else ImageNet's 7).")
    datasets: list[str] = _f(
        [],
        "Also evaluate CLIP_benchmark datasets by name (`wds/imagenet1k`) and suites (`suite/imagenet_robustness`, "
        "see `vlp eval --suite`), found under `eval.dataset_root`; each is logged as `eval/<dataset>/<task>/<metric>`, "
        "a suite also as `eval/suite/<name>/average`. Images are read from the shards when encoded, not held.",
    )
    dataset_root: str = _f(
        "", "Where `eval.datasets` are: a folder or URL template with `{dataset}` / `{dataset_cleaned}`."
    )
    split: str = _f("test", "Split of `eval.datasets` (their `{split}/nshards.txt`).")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
