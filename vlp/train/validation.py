"""Validation during training: held-out retrieval, best-weights tracking and early stopping.

Every ``train.val_every`` steps the model is scored on ``data.val_shards`` by retrieval (the mean
of R@1/5/10 image->text and text->image, CLIP_benchmark definitions). The best weights so far are
kept in CPU memory (trainable parameters and buffers only; frozen trunks never change); after
``train.early_stopping_patience`` validations without improvement the run stops, and it always
ends with the best weights. With cached trunk features the validation set is encoded once too.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)
RECALL_KEYS = tuple(f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10))


def score_of(metrics: dict) -> float:
    """The validation score: mean of the six recalls."""
    return sum(float(metrics[k]) for k in RECALL_KEYS) / len(RECALL_KEYS)


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    names |= {n for n, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in names}


class Validator:
    """Scores the model on the validation shards and remembers the best weights."""

    def __init__(self, trainer):
        self.t = trainer
        cfg = trainer.cfg
        self.every, self.patience = cfg.train.val_every, cfg.train.early_stopping_patience
        self.urls = cfg.data.val_shards
        if self.every and not self.urls:
            from vlp.config import ConfigError

            raise ConfigError("train.val_every needs data.val_shards (the held-out shards to validate on)")
        self.best_score, self.best_step, self.best_state = None, -1, None
        self.bad = 0
        self._data = None

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def _metrics(self) -> dict:
        from vlp.eval.retrieval import retrieval_metrics

        t = self.t
        if t.cached:
            if self._data is None:
                self._data = t.build_cache(self.urls, variants_key="", desc="val")
            cache = self._data
            heads = t.train_module
            was = heads.training
            heads.eval()
            with torch.no_grad():
                out = heads(cache.image.to(t.env.device), cache.text.to(t.env.device))
            heads.train(was)
            owner = torch.repeat_interleave(torch.arange(len(cache)), cache.first_text[1:] - cache.first_text[:-1])
            return retrieval_metrics(out["image_features"].float().cpu(), out["text_features"].float().cpu(), owner)
        from vlp.eval.run import build_specs, evaluate_tasks
        from vlp.eval.tasks import EvalContext
        from vlp.train.data import image_policy

        if self._data is None:
            self._data = build_specs(["zeroshot_retrieval"], [list(self.urls)])
        ctx = EvalContext(
            env=t.env,
            preprocess=t.eval_preprocess,
            batch_size=t.cfg.eval.batch_size,
            image_policy=image_policy(t.cfg.data),
        )
        with t.full_model() as model:
            return evaluate_tasks(model, t.tokenizer, self._data, ctx)[0]["metrics"]

    def run(self, step: int) -> bool:
        """Validate at ``step``; returns True when the run should stop early."""
        metrics = self._metrics()
        score = score_of(metrics)
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step, self.bad = score, step, 0
            if self.t.engine is not None:  # the fp32 master weights, not the module's bf16/fp16 copy
                from vlp.train.deepspeed_backend import master_state

                self.best_state = master_state(self.t.model)
            else:
                self.best_state = _trainable_state(self.t.model)
        else:
            self.bad += 1
        logged = {f"val/{k}": float(metrics[k]) for k in RECALL_KEYS}
        self.t.logger.log(step, {**logged, "val/score": score, "val/best_score": self.best_score})
        stop = bool(self.patience) and self.bad >= self.patience
        if stop and self.t.env.is_main:
            print(
                f"vlp: early stop at step {step}: no better validation score in {self.bad} checks "
                f"(best {self.best_score:.4f} at step {self.best_step})",
                flush=True,
            )
        return stop

    def restore_best(self, step: int) -> bool:
        """Load the best weights into the model if they are not the current ones; True if loaded."""
        if self.best_state is None or self.best_step == step:
            return False
        self.t.model.load_state_dict(self.best_state, strict=False)
        if self.t.engine is not None:  # DeepSpeed keeps fp32 master weights: they take the best ones too
            from vlp.train.deepspeed_backend import set_master_from_module

            set_master_from_module(self.t.model, self.best_state)
        if self.t.env.is_main:
            print(f"vlp: restored the best weights (step {self.best_step}, val score {self.best_score:.4f})")
        return True

    def state_dict(self) -> dict:
        return {"best_score": self.best_score, "best_step": self.best_step, "bad": self.bad, "state": self.best_state}

    def load_state_dict(self, state: dict | None) -> None:
        if state:
            self.best_score, self.best_step = state["best_score"], state["best_step"]
            self.bad, self.best_state = state["bad"], state["state"]

    def summary(self) -> dict:
        if self.best_score is None:
            return {}
        return {"best_step": self.best_step, "best_val_score": self.best_score}
