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


class CachedRetrieval:
    """Validation metrics of a run on cached trunk features: the validation shards encoded once by
    ``build_cache(urls)``, scored through the trainable ``heads``."""

    def __init__(self, build_cache, heads, urls, device):
        self.build_cache, self.heads, self.urls, self.device = build_cache, heads, urls, device
        self._cache = None

    def __call__(self) -> dict:
        from vlp.eval.retrieval import retrieval_metrics

        if self._cache is None:
            self._cache = self.build_cache(self.urls, variants_key="", desc="val")
        cache, heads = self._cache, self.heads
        was = heads.training
        heads.eval()
        with torch.no_grad():
            out = heads(cache.image.to(self.device), cache.text.to(self.device))
        heads.train(was)
        owner = torch.repeat_interleave(torch.arange(len(cache)), cache.first_text[1:] - cache.first_text[:-1])
        return retrieval_metrics(out["image_features"].float().cpu(), out["text_features"].float().cpu(), owner)


class StreamRetrieval:
    """Validation metrics of the full model (``full_model()``, the backend's) on the validation
    shards, read once, through the ``zeroshot_retrieval`` evaluation task with context ``ctx``."""

    def __init__(self, full_model, tokenizer, urls, ctx):
        self.full_model, self.tokenizer, self.urls, self.ctx = full_model, tokenizer, urls, ctx
        self._specs = None

    def __call__(self) -> dict:
        from vlp.eval.run import build_specs, evaluate_tasks

        if self._specs is None:
            self._specs = build_specs(["zeroshot_retrieval"], [list(self.urls)])
        with self.full_model() as model:
            return evaluate_tasks(model, self.tokenizer, self._specs, self.ctx)[0]["metrics"]


class Validator:
    """Scores the model (``measure()``: the retrieval metrics) and remembers the best weights
    through the training ``backend``; ``log(step, metrics)`` records the scores."""

    def __init__(self, train_cfg, urls, measure, backend, log, is_main: bool):
        self.every, self.patience = train_cfg.val_every, train_cfg.early_stopping_patience
        self.urls, self.measure, self.backend, self.log, self.is_main = urls, measure, backend, log, is_main
        if self.every and not self.urls:
            from vlp.config import ConfigError

            raise ConfigError("train.val_every needs data.val_shards (the held-out shards to validate on)")
        self.best_score, self.best_step, self.best_state = None, -1, None
        self.bad = 0

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0

    def run(self, step: int) -> bool:
        """Validate at ``step``; returns True when the run should stop early."""
        metrics = self.measure()
        score = score_of(metrics)
        improved = self.best_score is None or score > self.best_score
        if improved:
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_state = self.backend.trainable_state()
        else:
            self.bad += 1
        logged = {f"val/{k}": float(metrics[k]) for k in RECALL_KEYS}
        self.log(step, {**logged, "val/score": score, "val/best_score": self.best_score})
        stop = bool(self.patience) and self.bad >= self.patience
        if stop and self.is_main:
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
        self.backend.load_trainable_state(self.best_state)
        if self.is_main:
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
