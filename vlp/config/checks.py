"""Value checks of a loaded configuration that types cannot express (ranges, combinations)."""

from __future__ import annotations

from vlp.config.tree import Config, ConfigError


def check_values(self: Config) -> Config:
    """Value checks that types cannot express; raises ConfigError naming the key."""
    checks = [
        ("data.batch_size", self.data.batch_size >= 1, "must be >= 1"),
        ("data.workers", self.data.workers >= 0, "must be >= 0"),
        ("data.shuffle_buffer", self.data.shuffle_buffer >= 0, "must be >= 0"),
        ("data.max_unusable_samples", self.data.max_unusable_samples >= 0, "must be >= 0"),
        ("train.steps", self.train.steps >= 1 or self.train.epochs > 0, "must be >= 1"),
        ("train.lr", self.train.lr > 0, "must be > 0"),
        ("train.accum_steps", self.train.accum_steps >= 1, "must be >= 1"),
        ("train.warmup_steps", self.train.warmup_steps >= 0, "must be >= 0"),
        ("train.keep_checkpoints", self.train.keep_checkpoints >= 1, "must be >= 1"),
        ("train.log_every", self.train.log_every >= 1, "must be >= 1"),
        ("train.betas", len(self.train.betas) == 2, "must be two numbers, e.g. [0.9, 0.98]"),
        ("data.train_crop_scale", len(self.data.train_crop_scale) == 2, "must be [min, max]"),
        ("train.logit_scale_max", self.train.logit_scale_max > 1, "must be > 1"),
        ("loss.contrastive.tile_size", self.loss.contrastive.tile_size >= 1, "must be >= 1"),
        ("loss.contrastive.group_size", self.loss.contrastive.group_size >= 0, "must be >= 0"),
        ("loss.contrastive.label_smoothing", 0 <= self.loss.contrastive.label_smoothing < 1, "must be in [0, 1)"),
    ]
    m = self.model
    checks += [
        ("model.embed_dim", m.embed_dim >= 0, "must be >= 0"),
        ("model.patch_dropout", 0 <= m.patch_dropout < 1, "must be in [0, 1)"),
        ("model.embed_dim", m.name != "custom" or m.embed_dim > 0, "must be > 0 when model.name is custom"),
        (
            "model.vision.timm_model_name",
            m.name != "custom" or bool(m.vision.timm_model_name),
            "is required when model.name is custom",
        ),
        (
            "model.text.hf_model_name_or_path",
            m.name != "custom" or bool(m.text.hf_model_name_or_path),
            "is required when model.name is custom",
        ),
        ("model.vision.mean", len(m.vision.mean) in (0, 3), "must be empty or 3 numbers"),
        ("model.preprocess.mean", len(m.preprocess.mean) in (0, 3), "must be empty or 3 numbers"),
        (
            "model.preprocess.std",
            len(m.preprocess.std) in (0, 3) and all(x > 0 for x in m.preprocess.std),
            "must be empty or 3 positive numbers",
        ),
        ("model.vision.std", len(m.vision.std) in (0, 3), "must be empty or 3 numbers"),
        ("model.vision.unlocked_groups", m.vision.unlocked_groups >= 0, "must be >= 0"),
        ("model.text.unlocked_layers", m.text.unlocked_layers >= 0, "must be >= 0"),
        ("model.text.context_length", m.text.context_length >= 2, "must be >= 2"),
        ("train.val_every", self.train.val_every >= 0, "must be >= 0"),
        ("train.early_stopping_patience", self.train.early_stopping_patience >= 0, "must be >= 0"),
        ("train.deepspeed.zero_stage", self.train.deepspeed.zero_stage in (0, 1, 2, 3), "must be 0, 1, 2 or 3"),
        ("train.max_bad_steps", self.train.max_bad_steps >= 0, "must be >= 0"),
    ]
    checks += _lora_checks(m)
    dl = self.loss.distill
    checks += [
        ("loss.caption_weight", self.loss.caption_weight >= 0, "must be >= 0"),
        ("loss.itm_weight", self.loss.itm_weight >= 0, "must be >= 0"),
        ("loss.counting_weight", self.loss.counting_weight >= 0, "must be >= 0"),
        ("loss.pair_weight", self.loss.pair_weight >= 0, "must be >= 0"),
        ("data.negatives.k", self.data.negatives.k >= 0, "must be >= 0"),
        ("loss.negatives.image_grounded_weight", self.loss.negatives.image_grounded_weight >= 0, "must be >= 0"),
        ("loss.negatives.text_grounded_weight", self.loss.negatives.text_grounded_weight >= 0, "must be >= 0"),
        ("loss.distill.momentum", 0 <= dl.momentum < 1, "must be in [0, 1)"),
        ("loss.distill.queue_size", dl.queue_size >= 0, "must be >= 0"),
        ("loss.distill.alpha", 0 <= dl.alpha <= 1, "must be in [0, 1]"),
        ("loss.distill.alpha_warmup_steps", dl.alpha_warmup_steps >= -1, "must be >= -1"),
        (
            "loss.distill.enabled",
            not dl.enabled or (self.loss.contrastive.type, self.loss.contrastive.impl) == ("clip", "gather"),
            "needs loss.contrastive.type=clip and impl=gather (the soft targets need every column)",
        ),
    ]
    c = self.loss.contrastive
    valid = {"clip": ("gather", "tiled", "grouped"), "siglip": ("gather", "ring")}[c.type]
    checks.append(("loss.contrastive.impl", c.impl in valid, f"is not an impl of type {c.type}: {', '.join(valid)}"))
    checks.append(
        ("loss.contrastive.dcl", not (c.dcl and c.label_smoothing), "cannot be combined with label_smoothing")
    )
    if self.eval.data:
        ok = len(self.eval.data) == len(self.eval.tasks)
        checks.append(("eval.data", ok, "needs one entry per eval.tasks entry"))
    if self.data.train_weights:
        ok = len(self.data.train_weights) == len(self.data.train_shards)
        checks.append(("data.train_weights", ok, "needs one weight per data.train_shards entry"))
        checks.append(("data.train_weights", all(w > 0 for w in self.data.train_weights), "must be > 0"))
    checks.append(("data.alpha_background", _is_colour(self.data.alpha_background), _COLOUR_HELP))
    for key, ok, msg in checks:
        if not ok:
            raise ConfigError(f"config key '{key}' = {_get(self, key)!r} {msg}")
    return self


def _lora_checks(m) -> list[tuple[str, bool, str]]:
    """model.lora: ranges, and what LoRA replaces or would leave untrained."""
    lo = m.lora
    checks = [
        ("model.lora.rank", lo.rank >= 0, "must be >= 0 (0 = off)"),
        ("model.lora.alpha", lo.alpha > 0, "must be > 0"),
        ("model.lora.dropout", 0 <= lo.dropout < 1, "must be in [0, 1)"),
    ]
    if lo.rank > 0:
        names = [t.strip() for t in lo.targets]
        checks += [
            ("model.lora.targets", bool(names) and all(names), "must name at least one layer (and no empty name)"),
            (
                "model.vision.lock",
                not m.vision.lock,
                "cannot be combined with model.lora (LoRA freezes every base weight itself)",
            ),
            ("model.text.lock", not m.text.lock, "cannot be combined with model.lora (LoRA freezes every base weight)"),
            (
                "model.itm_head",
                not m.itm_head,
                "cannot be combined with model.lora: the new head would stay frozen at its random init",
            ),
        ]
    return checks


_COLOUR_HELP = "must be a colour name (white), #rrggbb, r,g,b (0-255 each) or none"


def parse_colour(value: str | None) -> tuple[int, int, int] | None:
    """``"white"``, ``"#808080"``, ``"128,128,128"`` -> an RGB triple; ``"none"``/``""``/None ->
    None. Raises ValueError naming the accepted forms. (The one reader of ``data.alpha_background``
    and ``--alpha-background``: :mod:`vlp.data.images` uses it too.)"""
    from PIL import ImageColor

    if value is None or str(value).strip().lower() in ("", "none"):
        return None
    text = str(value).strip()
    try:
        if "," in text:
            rgb = tuple(int(v) for v in text.split(","))
            if len(rgb) != 3 or not all(0 <= v <= 255 for v in rgb):
                raise ValueError
            return rgb  # type: ignore[return-value]
        return ImageColor.getrgb(text)[:3]
    except ValueError:
        raise ValueError(
            f"alpha background {value!r}: expected a colour name (white), #rrggbb, r,g,b (0-255 each) or none"
        ) from None


def _is_colour(text: str) -> bool:
    try:
        parse_colour(text)
    except ValueError:
        return False
    return True


def _get(cfg, dotted: str):
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg
