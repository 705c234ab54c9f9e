"""The trainer's side of the momentum teacher: building it from the config, its features for each
micro-batch before the step, its EMA update and enqueue after the step.

A teacher exists for ALBEF's momentum distillation (``loss.distill.enabled``) and for DeGLA's
text-grounded contrast (``loss.negatives.text_grounded_weight``, which needs the teacher's text
features but no queue).
"""

from __future__ import annotations

import torch

from vlp.config import ConfigError
from vlp.models.momentum import MomentumTeacher, alpha_at


def needs_teacher(loss_cfg) -> bool:
    return bool(loss_cfg.distill.enabled or loss_cfg.negatives.text_grounded_weight)


class TeacherStep:
    """Wraps a :class:`MomentumTeacher` for the training loop (``teacher`` is the module itself)."""

    def __init__(self, model, cfg, env):
        d = cfg.loss.distill
        self.cfg, self.env = cfg, env
        queue = d.queue_size if d.enabled else 0  # the text-grounded contrast uses no queue
        self.teacher = MomentumTeacher(model, momentum=d.momentum, queue_size=queue).to(env.device)
        global_batch = cfg.data.batch_size * env.world * cfg.train.accum_steps
        try:
            self.teacher.check_global_batch(global_batch)
        except ValueError as e:
            raise ConfigError(str(e)) from None
        self.alpha_warmup = self._warmup_steps(global_batch)

    def _warmup_steps(self, global_batch: int) -> int:
        warmup = self.cfg.loss.distill.alpha_warmup_steps
        if warmup >= 0:
            return warmup
        from vlp.train.data import samples_per_epoch

        n = samples_per_epoch(self.cfg.data)  # -1: one epoch
        if not n:
            raise ConfigError(
                "loss.distill.alpha_warmup_steps=-1 (one epoch) needs the epoch length: set "
                "data.samples_per_epoch, put sizes.json beside the shards, or give the steps"
            )
        return max(1, round(n / global_batch))

    def alpha(self, step: int) -> float:
        d = self.cfg.loss.distill
        return alpha_at(step, self.alpha_warmup, d.alpha) if d.enabled else 0.0

    def with_features(self, micro_batches: list[dict], autocast, images) -> list[dict]:
        """Each micro-batch with the teacher's features of the same images and tokens;
        ``images(batch["image"], device)`` is the student's image input (``DeviceNormalize``)."""
        out, dev = [], self.env.device
        for batch in micro_batches:
            pixels = images(batch["image"], dev)
            with autocast():
                img, txt = self.teacher.features(pixels, batch["text"].to(dev, non_blocking=True))
            out.append({**batch, "teacher_image_features": img.float(), "teacher_text_features": txt.float()})
        return out

    def after_step(self, model, micro_batches: list[dict]) -> None:
        """EMA towards the updated weights; queue the step's teacher features (all ranks)."""
        self.teacher.update(model)
        img = torch.cat([b["teacher_image_features"] for b in micro_batches])
        txt = torch.cat([b["teacher_text_features"] for b in micro_batches])
        self.teacher.enqueue(img, txt, group=self.env.group)
