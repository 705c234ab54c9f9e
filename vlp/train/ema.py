"""Weight EMA (``train.ema``): an exponential moving average of the trainable weights.

- Kept in fp32 on the training device, where the backend keeps its fp32 weights and split as it
  splits them: whole tensors for one process and DDP (every rank the same), FSDP2's shards of the
  sharded parameters, ZeRO-1/2's fragments of the optimizer's fp32 master weights (the module's
  bf16/fp16 copies are never averaged). A backend says which through ``ema_weights()``.
- Updated after an optimizer step that changed the weights (a skipped non-finite step, a step
  the fp16 GradScaler skipped, or a DeepSpeed fp16 overflow, does not update it), with one
  ``torch._foreach_lerp_`` over the pieces: ``ema <- ema + (1 - decay) * (weights - ema)``.
  ``warmup``: the EMA starts at optimizer step ``warmup``, set to the weights then (0: the initial
  weights); ``every``: it is averaged at the steps after that which are multiples of ``every``,
  ``decay`` applying per update.
- Saved in every checkpoint as ``state["ema"] = {"decay", "warmup", "every", "weights": {name:
  full fp32 tensor}}`` (gathered from the shards; the trainable parameters only: frozen weights
  and buffers are the checkpoint's own), restored exactly on resume.
- Evaluated beside the live weights: :meth:`WeightEMA.applied` puts the EMA into the backend's
  full model for the block and the live weights back after it.
- Refused at start-up (:func:`check_supported`): ZeRO-3, which writes its client state once per
  rank (the full EMA W times over); DeepSpeed's fp16 at stage 0, whose fp32 master weights sit
  where the EMA cannot follow them.
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

from vlp.checkpoint import CheckpointError
from vlp.config import ConfigError


def check_supported(cfg) -> None:
    """ConfigError (one line) for a ``train.ema`` that cannot run; before any process group starts."""
    e, t = cfg.train.ema, cfg.train
    for key, ok, need in (
        ("decay", 0 <= e.decay < 1, "in [0, 1)"),
        ("warmup", e.warmup >= 0, ">= 0"),
        ("every", e.every >= 1, ">= 1"),
    ):
        if not ok:
            raise ConfigError(f"config key 'train.ema.{key}' = {getattr(e, key)!r} must be {need}")
    if not e.decay or t.backend != "deepspeed":
        return
    if t.deepspeed.zero_stage == 3:
        raise ConfigError(
            "train.ema with train.deepspeed.zero_stage=3: ZeRO-3 saves vlp's state once per rank, so every rank "
            "would write the full EMA; use zero_stage 1 or 2, or train.backend=fsdp (the EMA stays sharded there)"
        )
    if t.deepspeed.zero_stage == 0 and cfg.model.precision == "fp16":
        raise ConfigError(
            "train.ema with DeepSpeed fp16 at zero_stage=0: its fp16 optimizer keeps the fp32 master weights "
            "where the EMA cannot follow them; use zero_stage 1 or 2, or model.precision=bf16"
        )


def build_ema(ema_cfg, backend) -> WeightEMA | NoEMA:
    """The run's EMA (:class:`NoEMA` when ``train.ema.decay`` is 0), started from the backend's
    current weights; prints what it keeps on the main rank."""
    if not ema_cfg.decay:
        return NoEMA()
    ema = WeightEMA(ema_cfg, backend.ema_weights())
    if backend.env.is_main:
        start = f"from step {ema_cfg.warmup}" if ema_cfg.warmup else "from the initial weights"
        every = f", every {ema_cfg.every} steps" if ema_cfg.every > 1 else ""
        print(
            f"vlp: weight EMA, decay {ema_cfg.decay:g} {start}{every}: {ema.numel():,} fp32 values on this rank",
            flush=True,
        )
    return ema


class NoEMA:
    """``train.ema.decay: 0``: the trainer's hooks do nothing; only the live weights are evaluated."""

    enabled = False

    def after_step(self, step: int) -> None:
        pass

    def checkpoint_state(self) -> dict:
        return {}

    def load(self, state: dict, path) -> None:
        pass

    def weight_sets(self, full_model) -> list:
        """``(metrics prefix, context giving a model)`` of each set of weights to evaluate."""
        return [("eval", full_model)]


class WeightEMA:
    """The EMA of ``weights`` (the backend's trainable fp32 weights: :class:`ModuleWeights`,
    :class:`MasterWeights`) under ``ema_cfg`` (``train.ema``)."""

    enabled = True

    def __init__(self, ema_cfg, weights):
        self.decay, self.warmup, self.every = float(ema_cfg.decay), int(ema_cfg.warmup), int(ema_cfg.every)
        self.weights = weights
        self._link()
        self.shadow = [None if s is None else s.detach().float().clone() for s in self._sources]
        self._pair()

    def _link(self) -> None:
        """The live pieces this rank holds (again after a resume: DeepSpeed relinks its fragments)."""
        self._sources = self.weights.pieces()

    def _pair(self) -> None:
        held = [i for i, s in enumerate(self._sources) if s is not None]
        self._src = [self._sources[i] for i in held]
        self._dst = [self.shadow[i] for i in held]

    def numel(self) -> int:
        return sum(t.numel() for t in self._dst)

    @torch.no_grad()
    def after_step(self, step: int) -> None:
        """After optimizer step ``step`` (counted from 1) changed the weights."""
        if not self._dst or not self.weights.applied():
            return
        if step == self.warmup:
            torch._foreach_copy_(self._dst, self._src)
        elif step > self.warmup and step % self.every == 0:
            torch._foreach_lerp_(self._dst, self._src, 1.0 - self.decay)

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every averaged weight in full, fp32, on the device (a collective: every rank calls it)."""
        return self.weights.gather(self.shadow)

    def checkpoint_state(self) -> dict:
        """What a checkpoint holds (a collective)."""
        weights = {k: v.to("cpu", copy=True) for k, v in self.full_state().items()}
        return {"ema": {"decay": self.decay, "warmup": self.warmup, "every": self.every, "weights": weights}}

    @torch.no_grad()
    def load(self, state: dict, path) -> None:
        """Restore the EMA from a checkpoint's ``state`` (after the backend loaded its weights); a
        checkpoint trained without one starts the EMA from the resumed weights."""
        self._link()
        saved = state.get("ema")
        if not saved:
            self.shadow = [None if s is None else s.detach().float().clone() for s in self._sources]
            self._pair()
            if self.weights.is_main:
                print(f"vlp: {path} holds no weight EMA: it starts from the resumed weights", flush=True)
            return
        names, got = self.weights.names, saved["weights"]
        if set(got) != set(names):
            odd = sorted(set(got) ^ set(names))
            raise CheckpointError(
                f"{path}: its weight EMA holds other parameters than this run trains ({len(odd)} differ, e.g. "
                f"{odd[:3]}); start a new output_dir or resume without train.ema"
            )
        self.shadow = [None if p is None else p.float().clone() for p in self.weights.split(got)]
        self._pair()

    @contextlib.contextmanager
    def applied(self, full_model):
        """``full_model()``'s model (the backend's, with full weights) holding the EMA in place of
        its trainable weights inside the block; the live weights are put back after it."""
        averaged = self.full_state()  # a collective, before the backend gathers its own weights
        with full_model() as model, torch.no_grad():
            params = dict(model.named_parameters())
            live = {n: params[n].detach().clone() for n in averaged}
            try:
                for n, value in averaged.items():
                    params[n].copy_(value.reshape(params[n].shape))
                yield model
            finally:
                for n, value in live.items():
                    params[n].copy_(value)

    def weight_sets(self, full_model) -> list:
        """The live weights (metrics ``eval/...``) and the EMA (``eval_ema/...``)."""
        return [("eval", full_model), ("eval_ema", lambda: self.applied(full_model))]


# ---- the weights an EMA follows, as each backend holds them ----------------------------------------


def _is_dtensor(t) -> bool:
    return hasattr(t, "device_mesh") and hasattr(t, "to_local")


class ModuleWeights:
    """The trainable parameters of a module that keeps them in fp32 (one process, DDP, FSDP2): whole
    tensors, or for FSDP2's DTensors this rank's shard of each."""

    def __init__(self, model: torch.nn.Module, is_main: bool = True, applied=None):
        self._applied = applied  # () -> whether the last optimizer step changed the weights; None: always
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        low = [(n, p.dtype) for n, p in named if p.dtype != torch.float32]
        if low:
            raise ConfigError(f"train.ema: parameter {low[0][0]} is {low[0][1]}; the EMA follows fp32 weights")
        self.names, self.params, self.is_main = [n for n, _ in named], [p for _, p in named], is_main

    def pieces(self) -> list[torch.Tensor]:
        return [p.detach().to_local() if _is_dtensor(p) else p.detach() for p in self.params]

    def applied(self) -> bool:
        return self._applied is None or bool(self._applied())

    def gather(self, pieces: list) -> dict[str, torch.Tensor]:
        from torch.distributed.tensor import DTensor

        out = {}
        for name, p, piece in zip(self.names, self.params, pieces):
            if _is_dtensor(p):  # every rank its shard: gathered into the full tensor on every rank
                piece = DTensor.from_local(
                    piece, p.device_mesh, p.placements, shape=p.shape, stride=p.stride()
                ).full_tensor()
            out[name] = piece.detach()
        return out

    def split(self, full: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        from torch.distributed.tensor import distribute_tensor

        out = []
        for name, p in zip(self.names, self.params):
            value = full[name].to(p.device, torch.float32).reshape(p.shape)
            if _is_dtensor(p):  # this rank's shard, cut from the full tensor every rank holds
                value = distribute_tensor(value, p.device_mesh, p.placements, src_data_rank=None).to_local()
            out.append(value)
        return out


class MasterWeights:
    """DeepSpeed's fp32 master weights (ZeRO 0-2): each rank's fragment of each trainable parameter
    in the optimizer's flat fp32 partition (DeepSpeed's ``_hp_mapping``, what its own
    ``safe_get_full_fp32_param`` reads; a rank holding none of a parameter has None), or, where no
    optimizer partition exists (stage 0, fp32), the module's parameters themselves, on every rank."""

    def __init__(self, engine, model: torch.nn.Module, group, is_main: bool):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names, self.params = [n for n, _ in named], [p for _, p in named]
        self.engine, self.group, self.is_main = engine, group, is_main
        for name, p in named:
            if not hasattr(p, "_hp_mapping") and p.dtype != torch.float32:
                raise ConfigError(f"train.ema: DeepSpeed keeps no fp32 master copy of {name} the EMA can follow")

    def pieces(self) -> list[torch.Tensor | None]:
        out = []
        for p in self.params:
            if hasattr(p, "_hp_mapping"):
                out.append(None if p._hp_mapping is None else p._hp_mapping.get_hp_fragment())
            else:
                out.append(p.detach())
        return out

    def applied(self) -> bool:
        return bool(self.engine.was_step_applied())  # False after an fp16 overflow the engine skipped

    def _spans(self):
        """(parameter, offset in one flat buffer of every parameter, its fragment address or None)."""
        offset = 0
        for p in self.params:
            mapping = getattr(p, "_hp_mapping", None)
            yield p, offset, mapping.lp_fragment_address if mapping is not None else None
            offset += p.numel()

    def gather(self, pieces: list) -> dict[str, torch.Tensor]:
        # as DeepSpeed's get_full_hp_param: every rank writes its fragments into zeros, one all-reduce sums them
        total = sum(p.numel() for p in self.params)
        flat = torch.zeros(total, dtype=torch.float32, device=self.params[0].device if self.params else "cpu")
        rank = dist.get_rank(self.group) if dist.is_initialized() else 0
        for (p, offset, address), piece in zip(self._spans(), pieces):
            if address is not None and piece is not None:
                flat.narrow(0, offset + address.start, address.numel).copy_(piece.reshape(-1))
            elif not hasattr(p, "_hp_mapping") and rank == 0:  # the same on every rank: counted once
                flat.narrow(0, offset, p.numel()).copy_(piece.reshape(-1))
        if dist.is_initialized():
            dist.all_reduce(flat, group=self.group)
        out = {}
        for name, (p, offset, _) in zip(self.names, self._spans()):
            out[name] = flat.narrow(0, offset, p.numel()).reshape(p.shape)
        return out

    def split(self, full: dict[str, torch.Tensor]) -> list[torch.Tensor | None]:
        out = []
        for name, (p, _, address) in zip(self.names, self._spans()):
            value = full[name].to(p.device, torch.float32).reshape(-1)
            if hasattr(p, "_hp_mapping"):
                out.append(None if address is None else value.narrow(0, address.start, address.numel))
            else:
                out.append(value.reshape(p.shape))
        return out
