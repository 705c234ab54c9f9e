"""The Trainer: builders in ``__init__``, a ``train()`` loop that reads like pseudocode."""

from __future__ import annotations

import contextlib
import logging
import random
import time
from pathlib import Path

import numpy as np
import torch

from vlp.checkpoint import CheckpointError, training_state
from vlp.config import Config, ConfigError, save_config
from vlp.data.transforms import DeviceNormalize
from vlp.distributed import DistEnv, all_gather_objects, barrier
from vlp.losses import Objective
from vlp.models import lora
from vlp.models.extras import ExtraTexts
from vlp.models.pretrained import describe_preprocess, describe_weights
from vlp.models.registry import build, eval_preprocess, preprocess_of
from vlp.models.tokenizer import get_tokenizer
from vlp.models.towers import trainable_count
from vlp.train import backends, run_folder
from vlp.train.data import build_train_loader, image_policy, resolve_total_steps
from vlp.train.data_counts import DataCounts
from vlp.train.ema import build_ema
from vlp.train.feature_cache import CachedBatches, CachedHeads, build_feature_cache, cache_supported, fingerprint
from vlp.train.guards import NonFiniteGuard, StopRequested, StopSignals
from vlp.train.logging import MetricsLogger
from vlp.train.optim import build_optimizer, build_scheduler
from vlp.train.remote_outputs import RemoteRun, fetched
from vlp.train.resume_state import check_resumable, data_state_of_rank, rng_states, set_rng_states
from vlp.train.step import forward_backward
from vlp.train.teacher import TeacherStep, needs_teacher
from vlp.train.tracking import Tracking
from vlp.train.validation import CachedRetrieval, StreamRetrieval, Validator

log = logging.getLogger(__name__)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Trainer:
    """Trains ``cfg.model`` on ``cfg.data`` with ``cfg.loss``; see ``docs/configuration.md``."""

    def __init__(self, cfg: Config, env: DistEnv | None = None):
        self.cfg = cfg
        # what the backend cannot train stops now, before a process group is started for it
        backends.check_supported(cfg, extra_captions=self._extra_captions(), teacher=needs_teacher(cfg.loss))
        self.env = env or backends.init_distributed(cfg.train)
        t, dev = cfg.train, self.env.device
        self._check_settings()
        self.tracking = Tracking(cfg)  # train.report_to (wandb requested but not installed: stop now)
        self.eval_specs = self._load_eval_specs()
        _seed_everything(t.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
        # the weights' architecture and preprocessing go into the config every checkpoint saves
        self.model, cfg.model = build(cfg.model)
        self.mean, self.std = tuple(cfg.model.preprocess.mean), tuple(cfg.model.preprocess.std)
        self.model.to(dev)
        if self.env.is_main:
            print(f"vlp: model {describe_weights(cfg.model)}; images: {describe_preprocess(preprocess_of(self.model))}")
        if self.env.is_main and cfg.model.lora.rank:  # before a backend shards the parameters
            print(f"vlp: {lora.describe(self.model, cfg.model.lora.rank)}", flush=True)
        self.tokenizer = get_tokenizer(cfg.model)
        self.eval_preprocess = eval_preprocess(self.model)
        self.normalize = DeviceNormalize(self.mean, self.std)  # training batches' uint8 images, on the device
        self.cached = self._use_feature_cache()
        # with cached trunk features only the heads run in a step; they share the model's parameters
        self.train_module = CachedHeads(self.model) if self.cached else self.model
        if self._extra_captions():  # hard negatives / counterfactuals are encoded inside the forward
            self.train_module = ExtraTexts(self.model)
        self.total_steps = resolve_total_steps(cfg, self.env.world)
        # the teacher copies the fp32 weights before DeepSpeed casts the module to bf16/fp16
        self.teacher_step = TeacherStep(self.model, cfg, self.env) if needs_teacher(cfg.loss) else None
        self.teacher = self.teacher_step.teacher if self.teacher_step else None
        self.objective = Objective(cfg.loss, teacher=self.teacher)
        self.remote = RemoteRun.of(t, self.env)  # an fsspec URL: written to a local staging folder, then uploaded
        self.out_dir = self.remote.staging if self.remote else Path(t.output_dir)
        self.outputs_at = self.remote.url if self.remote else str(self.out_dir)
        self.backend = backends.build_backend(
            cfg,
            self.env,
            self.model,
            self.train_module,
            lambda model: build_optimizer(model, t),
            lambda optimizer: build_scheduler(optimizer, t, self.total_steps),
            self.out_dir,
            self._autocast,
        )
        self.optimizer, self.scheduler = self.backend.optimizer, self.backend.scheduler
        self.checkpointer = self.backend.checkpointer
        self.ema = build_ema(t.ema, self.backend)  # train.ema (vlp.train.ema); a no-op when off
        if self.env.is_main and (line := self.backend.describe()):
            print(f"vlp: {line}", flush=True)
        self.step = 0
        self.guard = NonFiniteGuard(t.max_bad_steps)
        self.signals = StopSignals()
        self.data_counts = DataCounts(self.env, cfg.loss.pair_weight, self.cached)
        self.eval_results: list[dict] = []
        self.last_eval_step = -1
        self.last_checkpoint: Path | None = None
        self.validator = Validator(
            t, cfg.data.val_shards, self._validation_measure(), self.backend,
            lambda step, metrics: self.logger.log(step, metrics), self.env.is_main,
        )  # fmt: skip
        _seed_everything(t.seed + 1000 * self.env.rank)  # per-rank streams for dropout etc.

    def full_model(self):
        """The model usable outside the training forward (evaluation, validation, saving weights),
        with full weights (the backend gathers shards and autocasts where it must)."""
        return self.backend.full_model()

    def _validation_measure(self):
        """What validation scores: the cached heads on the cached val features, or the full model."""
        if self.cached:
            return CachedRetrieval(self.build_cache, self.train_module, self.cfg.data.val_shards, self.env.device)
        return StreamRetrieval(self.full_model, self.tokenizer, self.cfg.data.val_shards, self.eval_context())

    def eval_context(self, plots_dir=None):
        """How this run evaluates: its devices, preprocessing, batch size and image policy."""
        from vlp.eval.tasks import EvalContext

        return EvalContext(
            env=self.env,
            preprocess=self.eval_preprocess,
            batch_size=self.cfg.eval.batch_size,
            plots_dir=plots_dir,
            image_policy=image_policy(self.cfg.data),
        )

    def _check_settings(self) -> None:
        """Mistakes that depend on the launch or the eval data stop the run now, not hours later."""
        c = self.cfg.loss.contrastive
        if c.impl == "grouped" and c.group_size and self.env.world % c.group_size:
            raise ConfigError(
                f"loss.contrastive.group_size={c.group_size} does not divide the world size {self.env.world}"
            )

    def _extra_captions(self) -> bool:
        d = self.cfg.data
        return bool(d.negatives.k or d.counterfactuals or self.cfg.loss.pair_weight)

    def _use_feature_cache(self) -> bool:
        ok, why = cache_supported(self.model)
        trainable, total = trainable_count(self.model)
        locked = trainable < total and not self.cfg.model.lora.rank  # LoRA's line is printed at the build
        if self.env.is_main and locked:
            print(f"vlp: training {trainable:,} of {total:,} parameters (locked towers)", flush=True)
        if ok and self.cfg.loss.distill.enabled:
            ok, why = False, "momentum distillation runs the towers of its teacher"
        if ok and self._extra_captions():
            ok, why = False, "hard negatives, counterfactuals and minimal pairs are read from every batch"
        if self.cfg.model.cache_features == "off" or not ok:
            if self.cfg.model.cache_features == "auto" and locked:
                log.info("trunk features are not cached: %s", why)
            return False
        if self.cfg.data.train_weights:
            raise ConfigError("data.train_weights: cached trunk features sample every shard equally; "
                              "set model.cache_features=off to mix sources by weight")  # fmt: skip
        return True

    def build_cache(self, patterns, variants_key="", desc="train"):
        """The frozen trunks' features of every sample of ``patterns`` (encoded once, then on disk)."""
        from vlp.data.shardlists import expand_urls
        from vlp.models.towers import open_clip_config

        urls = [u for pattern in patterns for u in expand_urls(pattern)]
        preprocess = f"{self.eval_preprocess!r} {image_policy(self.cfg.data)!r}"
        key = fingerprint(urls, open_clip_config(self.cfg.model), preprocess, variants_key)
        return build_feature_cache(
            self.model,
            urls,
            self.eval_preprocess,
            self.tokenizer,
            self.env,
            cache_file=self.out_dir / "feature_cache" / f"{desc}-{key}.pt",
            data_cfg=self.cfg.data,
            batch_size=self.cfg.eval.batch_size,
            variants_key=variants_key,
            desc=desc,
        )

    def _build_loader(self, state):
        if not self.cached:
            return build_train_loader(self.cfg, self.model, self.env, state)
        e = self.env
        d = self.cfg.data
        cache = self.build_cache(d.train_shards, variants_key=d.caption_variants_key)
        return CachedBatches(cache, d.batch_size, rank=e.rank, world=e.world, seed=self.cfg.train.seed,
                             unique=d.unique_captions, state=state)  # fmt: skip

    def _load_eval_specs(self) -> list:
        """The eval tasks' data, read once (images stay on disk, local shards indexed), then the
        datasets and suites named in ``eval.datasets``."""
        from vlp.eval.named import named_specs
        from vlp.eval.run import build_specs

        e = self.cfg.eval
        paths = e.data or ([self.cfg.data.val_shards[0]] * len(e.tasks) if self.cfg.data.val_shards else [])
        specs = build_specs(e.tasks, paths, classnames=e.classnames, templates=e.templates) if paths else []
        named, self.eval_suites = named_specs(e.datasets, e.dataset_root, e.split)
        return specs + named

    # ---- the loop -------------------------------------------------------------------------
    def train(self) -> dict:
        t = self.cfg.train
        if self.remote:
            self.remote.claim(t.resume, t.overwrite)
        self.resume = self.remote.local_resume(t.resume) if self.remote else fetched(t.resume, self.env)
        run_folder.claim(self.out_dir, self.resume, t.overwrite, self.env.is_main)  # never over another run's files
        if self.env.is_main:  # unwritable or full: stop now, not at the first checkpoint
            run_folder.check_space(self.out_dir, self.model, self.teacher is not None, bool(t.ema.decay))
        data_state = self.maybe_resume()
        self.loader = self._build_loader(data_state)
        self._prepare_output()  # only once every check has passed: a rejected start leaves the run as it was
        self.logger = MetricsLogger(self.out_dir, self.env.is_main, self.total_steps, t.progress, start_step=self.step,
                                    tracking=self.tracking)  # fmt: skip
        batches = iter(self.loader)
        t0, seen = time.perf_counter(), 0
        self.signals.install()  # SIGTERM / SIGINT: finish the step, checkpoint, exit (guards.py)
        try:
            while self.step < self.total_steps:
                before = self.loader.state_dict() if t.accum_steps > 1 else None
                try:
                    micro = self._next_batches(batches)
                except StopRequested:  # while waiting for data: no step in progress (guards.py)
                    return self.preempted(data_state=before)
                loss, terms, updated = self.train_step(micro)
                seen += sum(len(b["caption"]) for b in micro)
                self.data_counts.count_pairs(micro)
                if updated:  # a skipped (non-finite) step is not a step: the next batch takes its place
                    self.step += 1
                    if self.step % self.cfg.train.log_every == 0 or self.step == self.total_steps:
                        self.log_step(loss, terms, seen / (time.perf_counter() - t0))
                        t0, seen = time.perf_counter(), 0
                    stop = self.validator.due(self.step) and self.validator.run(self.step)
                    self.maybe_evaluate()
                    self.maybe_checkpoint()
                    if stop:
                        break
                if self.signals.agreed(self.env):
                    return self.preempted()
        finally:
            self.signals.restore()
        return self.finish()

    def _next_batches(self, batches) -> list[dict]:
        """The next step's micro-batches. A single-process run can be stopped while it waits."""
        wait = self.signals.interruptible() if self.env.world == 1 else contextlib.nullcontext()
        with wait:
            return [next(batches) for _ in range(self.cfg.train.accum_steps)]

    def preempted(self, data_state: dict | None = None) -> dict:
        """A stop signal: checkpoint the last finished step (unless just written, or none was
        trained) and report. ``data_state``: the data position before a half-fetched step."""
        import signal

        getattr(self.loader, "close", lambda: None)()
        trained = self.step > 0
        if trained and not self._checkpoint_is_current():
            self.save_checkpoint(data_state)
        self.logger.close(preempted=True)
        if self.remote:  # the last upload: a failure is one line naming the local copy
            self.remote.finish()
        if self.env.is_main:
            name = signal.Signals(self.signals.received).name if self.signals.received else "a signal on another rank"
            done = f"checkpoint {self.last_checkpoint}" if trained else "no step was trained, nothing to checkpoint"
            print(
                f"vlp: preempted by {name} after step {self.step}: {done}; "
                f"continue with --resume latest (outputs in {self.outputs_at})",
                flush=True,
            )
        return {"step": self.step, "checkpoint": str(self.last_checkpoint), "output_dir": self.outputs_at,
                "preempted": True}  # fmt: skip

    def _checkpoint_is_current(self) -> bool:
        """Whether the last checkpoint written is of the current step."""
        return self.last_checkpoint is not None and self.checkpointer.path_for(self.step) == self.last_checkpoint

    def train_step(self, micro_batches) -> tuple[torch.Tensor, dict, bool]:
        """One optimizer step on ``micro_batches``: ``(loss, terms, whether the weights changed)``."""
        self.backend.module.train()
        self.backend.prepare(micro_batches)
        if self.teacher_step is not None:
            self.objective.alpha = self.teacher_step.alpha(self.step)
            micro_batches = self.teacher_step.with_features(micro_batches, self._autocast, self.normalize)
        loss, terms, out = forward_backward(
            self.backend.module,
            self.objective,
            micro_batches,
            device=self.env.device,
            autocast=self._autocast,
            group=self.env.group,
            backend=self.backend,
            images=self.normalize,
        )
        # the multiplier the step used (read at log time only: no host sync here; under ZeRO-3 the
        # module's own parameter is a partition outside the forward)
        self.last_logit_scale = out["logit_scale"].detach()
        updated = self.backend.step(loss, self.guard, self.step, self.last_checkpoint)
        if updated and self.teacher_step is not None:
            self.teacher_step.after_step(self.model, micro_batches)
        if updated:  # the step just taken: self.step counts it once this returns
            self.ema.after_step(self.step + 1)
        return loss, terms, updated

    def _autocast(self):
        p = self.cfg.model.precision
        if p == "fp32":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if p == "bf16" else torch.float16
        return torch.autocast(self.env.device.type, dtype=dtype)

    # ---- logging, evaluation, checkpoints ------------------------------------------------
    def log_step(self, loss, terms, samples_per_s_rank) -> None:
        metrics = {
            "loss": float(loss),
            **{f"loss/{k}": float(v) for k, v in terms.items()},
            "lr": self.scheduler.get_last_lr()[0],
            "logit_scale": float(self.last_logit_scale.reshape(-1)[0]),
            "samples_per_s": samples_per_s_rank * self.env.world,
            **self.data_counts.metrics(self.loader),
        }
        if self.guard.total:
            metrics["train/skipped_nonfinite"] = self.guard.total
        if self.cfg.loss.distill.enabled:
            metrics["distill/alpha"] = self.objective.alpha
        self.logger.log(self.step, metrics)
        self.logger.advance(self.cfg.train.log_every)

    def maybe_evaluate(self, force: bool = False) -> dict | None:
        every = self.cfg.train.eval_every
        if not self.eval_specs or not (force or (every and self.step % every == 0)):
            return None
        from vlp.eval.named import suite_averages
        from vlp.eval.run import evaluate_tasks, flat_metrics

        self.last_eval_step = self.step
        found = {}  # "eval": the live weights; with train.ema also "eval_ema": the EMA's
        for prefix, weights in self.ema.weight_sets(self.full_model):
            # every rank extracts its share of the features; all get the same results
            with weights() as model:
                raw = evaluate_tasks(model, self.tokenizer, self.eval_specs, self.eval_context(self.out_dir / prefix))
            found[prefix] = {**flat_metrics(raw), **suite_averages(self.eval_suites, raw)}
        results, ema = found["eval"], {f"ema/{k}": v for k, v in found.get("eval_ema", {}).items()}
        self.eval_results.append({"step": self.step, **results, **ema})
        self.logger.log(self.step, {f"{p}/{k}": v for p, r in found.items() for k, v in r.items()})
        return results

    def maybe_checkpoint(self, force: bool = False) -> None:
        every = self.cfg.train.checkpoint_every
        if force or (every and self.step % every == 0):
            try:
                self.save_checkpoint()
            except OSError as e:  # a full disk: the previous checkpoints are intact; keep training
                log.error(
                    "checkpoint at step %d not written (%s); the previous one (%s) is kept, next attempt at step %d",
                    self.step, e, self.last_checkpoint, self.step + every,
                )  # fmt: skip

    def save_checkpoint(self, data_state: dict | None = None) -> Path:
        if self.remote:  # the previous checkpoint's upload ends before retention may delete its file
            self.remote.before_save()
        rng = all_gather_objects(rng_states(self.env.device), self.env)
        data = all_gather_objects(data_state or self.loader.state_dict(), self.env)
        state = training_state(
            self.step,
            self.cfg.to_dict(),
            self.env.world,
            rng=rng,
            data=data,
            validation=self.validator.state_dict(),
            guard=self.guard.state_dict(),
            tracking=self.tracking.state_dict(),
        )
        if self.teacher is not None:
            state["teacher"] = self.teacher.state_dict()
        state.update(self.backend.model_state())  # {} where the backend's checkpointer saves them itself
        state.update(self.ema.checkpoint_state())  # train.ema's weights, gathered (a collective)
        try:
            path = self.checkpointer.save(self.step, state)
        finally:  # also when the write failed: the other ranks wait here
            barrier(self.env)
        self.last_checkpoint = path
        if self.remote:
            self.remote.after_save(path)
        return path

    def maybe_resume(self) -> dict | None:
        which = self.resume
        if not which:
            return None
        found = self.checkpointer.load(which)
        if found is None:
            if which == "latest":
                log.info("no checkpoint in %s: starting fresh", self.checkpointer.folder)
                return None
            raise CheckpointError(f"cannot resume from {which}")
        path, state = found
        check_resumable(path, state, self.cfg.model.name)
        self.backend.load_model_state(state, path, self.cfg.model.name)
        self.ema.load(state, path)
        self.step = int(state["step"])
        self.validator.load_state_dict(state.get("validation"))
        self.guard.load_state_dict(state.get("guard"))
        self.tracking.load_state_dict(state.get("tracking"))
        if self.teacher is not None:
            if "teacher" not in state:
                raise CheckpointError(f"{path}: has no momentum teacher (trained without one); start a new output_dir")
            self.teacher.load_state_dict(state["teacher"])
        if state.get("world") == self.env.world:
            set_rng_states(state["rng"][self.env.rank], self.env.device)
        self.last_checkpoint = Path(path)
        log.info("resumed from %s at step %d", path, self.step)
        if self.env.is_main:
            print(f"vlp: resumed from {path} (step {self.step})", flush=True)
            changed = run_folder.config_changes(state["config"], self.cfg.to_dict())
            if changed:
                print(f"vlp: the config differs from the checkpoint's: {'; '.join(changed)}", flush=True)
        return data_state_of_rank(state.get("data") or [], self.env.rank, self.env.world)

    def _prepare_output(self) -> None:
        if self.env.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            save_config(self.cfg, self.out_dir / "config.yaml")
        barrier(self.env)

    def finish(self) -> dict:
        getattr(self.loader, "close", lambda: None)()  # the training stream's persistent workers: done
        restored = self.validator.restore_best(self.step)
        # the final checkpoint first: nothing that happens in evaluation can lose the trained weights
        if restored or not self._checkpoint_is_current():
            self.save_checkpoint()
        if restored or self.last_eval_step != self.step:  # the same decision on every rank (barriers)
            self.maybe_evaluate(force=True)
        self.logger.close()
        if self.remote:  # the last upload: a failure is one line naming the local copy
            self.remote.finish()
        skipped, truncated = self.data_counts.totals(self.loader)
        summary = {
            "step": self.step,
            "checkpoint": str(self.last_checkpoint),
            "output_dir": self.outputs_at,
            "skipped": skipped,
            "truncated_captions": truncated,
            "eval": self.eval_results[-1] if self.eval_results else {},
            **self.validator.summary(),
        }
        if self.env.is_main:
            print(f"vlp: trained {self.step} steps; outputs in {self.outputs_at} (checkpoint {self.last_checkpoint})")
            if summary["skipped"]:
                print(f"vlp: skipped bad data: {summary['skipped']}")
            if truncated:
                context = getattr(self.tokenizer, "context_length", "its")
                print(f"vlp: {truncated} caption(s) were longer than the model's {context}-token context and were cut")
            if self.guard.total:
                print(f"vlp: skipped {self.guard.total} non-finite step(s) (loss or gradients; no update made)")
        barrier(self.env)  # every rank done talking before any tears down (vlp.distributed.shutdown)
        return summary
