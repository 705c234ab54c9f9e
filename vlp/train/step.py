"""Forward and backward of one optimizer step, with exact contrastive accumulation.

With k micro-batches, a plain accumulation would compute each contrastive loss over one
micro-batch only (fewer negatives: not the large-batch gradient). Instead (GradCache):
1. forward every micro-batch without gradients, recording the RNG state before each;
2. compute the objective's global terms on the concatenated outputs, backward to the cached
   outputs;
3. re-forward each micro-batch with gradients from its recorded RNG state (dropout, patch
   dropout and augmentation-in-model replay exactly) and backward the surrogate
   sum(output * cached_gradient) plus the micro-batch's local terms (CoCa's captioning loss)
   weighted by its share of the tokens they average over, with DDP's gradient sync only on the
   last micro-batch.
The parameter gradients equal those of one step over all k micro-batches.

Outputs named ``teacher_*`` (the momentum teacher's features, put in the batch by the trainer)
are constants: they enter the loss but get no gradient.
"""

from __future__ import annotations

import contextlib

import torch

from vlp.models.extras import EXTRA_KEYS


def _rng_state(device: torch.device):
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state, device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


CONSTANT_PREFIX = "teacher_"


def move_images(images: torch.Tensor, device) -> torch.Tensor:
    """The default image input: a preprocessed float tensor, moved. The training stream's uint8
    batches need the model's normalisation: pass ``images=DeviceNormalize(mean, std)``."""
    if not images.is_floating_point():
        raise TypeError(
            f"batch['image'] is {images.dtype}: uint8 images need forward_backward(images=DeviceNormalize(mean, std))"
        )
    return images.to(device, non_blocking=True)


def _forward(model, batch, device, autocast, images):
    extras = {k: batch[k].to(device, non_blocking=True) for k in EXTRA_KEYS if k in batch}
    pixels = images(batch["image"], device)  # uint8 -> normalised float happens here, on the device
    with autocast():
        out = model(pixels, batch["text"].to(device, non_blocking=True), **extras)
    out.update({k: v.to(device) for k, v in batch.items() if k.startswith(CONSTANT_PREFIX)})
    # losses run in fp32 (or the model's own fp64) whatever the autocast dtype
    low = (torch.float16, torch.bfloat16)
    return {k: v.float() if torch.is_tensor(v) and v.dtype in low else v for k, v in out.items()}


class _Autograd:
    """The step's backward without a training backend (direct callers: tests, benchmarks): GradScaler's
    scaling when given, autograd, and DDP's ``no_sync`` when ``model`` has it."""

    def __init__(self, scaler, model):
        self.scaler, self.model = scaler, model

    def scale(self, loss):
        return self.scaler.scale(loss) if self.scaler is not None else loss

    def backward(self, loss) -> None:
        loss.backward()

    def no_sync(self, last: bool):
        if last or not hasattr(self.model, "no_sync"):
            return contextlib.nullcontext()
        return self.model.no_sync()


def forward_backward(
    model, objective, micro_batches, *, device, autocast, scaler=None, group=None, backend=None, images=move_images
):
    """Run forward and backward for one optimizer step; returns ``(loss, terms, last_outputs)``.

    ``loss`` and ``terms`` are detached; gradients are left in the parameters. ``backend`` (a
    :class:`vlp.train.backend_api.TrainingBackend`; ``model`` is its ``module``) scales losses, runs
    backward and says when gradients are reduced (a DeepSpeed engine also steps in its backward);
    without one, autograd with ``scaler``'s scaling (a ``torch.amp.GradScaler``, or None).
    ``images(batch["image"], device)`` makes the model's image input
    (``vlp.data.transforms.DeviceNormalize`` for the training stream's uint8 batches).
    """
    backend = backend or _Autograd(scaler, model)
    if len(micro_batches) == 1:
        out = _forward(model, micro_batches[0], device, autocast, images)
        loss, terms = objective(out, group)
        backend.backward(backend.scale(loss))
        return loss.detach(), {k: v.detach() for k, v in terms.items()}, out
    return _cached_accumulation(model, objective, micro_batches, device, autocast, backend, group, images)


def _cached_accumulation(model, objective, micro_batches, device, autocast, backend, group, images):
    local_keys = getattr(objective, "LOCAL_KEYS", ())
    local_weights = getattr(objective, "local_weights", lambda out: {})
    rng, cached, weights = [], [], []
    with torch.no_grad():
        for batch in micro_batches:
            rng.append(_rng_state(device))
            out = _forward(model, batch, device, autocast, images)
            weights.append(local_weights(out))
            cached.append({k: v for k, v in out.items() if k not in local_keys})  # caption logits: B x L x V
    after_rng = _rng_state(device)
    # per-sample masks (has_cf) travel with the features, without gradients
    masks = [k for k, v in cached[0].items() if torch.is_tensor(v) and not v.is_floating_point() and v.ndim >= 1]
    keys = [k for k, v in cached[0].items() if torch.is_tensor(v) and v.is_floating_point()]
    # per-sample outputs (B x D features, B x K x D negatives) are concatenated; the scale and bias are shared
    batched = [k for k in keys if cached[0][k].ndim >= 2]
    leaves = {}
    for k in keys:
        # per-sample outputs are concatenated; shared ones (logit scale) are the same in every micro-batch
        value = torch.cat([c[k] for c in cached]) if k in batched else cached[0][k]
        leaves[k] = value.detach().requires_grad_(not k.startswith(CONSTANT_PREFIX))
    leaves.update({k: torch.cat([c[k] for c in cached]) for k in masks})
    global_terms = getattr(objective, "global_terms", objective)
    loss, terms = global_terms(leaves, group)
    backend.scale(loss).backward()  # the features' gradients: autograd on the leaves, whatever the backend
    grads = {k: v.grad for k, v in leaves.items() if v.grad is not None}
    sizes = [c[batched[0]].shape[0] for c in cached] if batched else []
    split = {k: torch.split(g, sizes) for k, g in grads.items() if k in batched}
    local_sum: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        _set_rng_state(rng[i], device)
        with backend.no_sync(last):
            out = _forward(model, batch, device, autocast, images)
            surrogate = sum((out[k] * split[k][i]).sum() for k in split)
            for k, g in grads.items():
                if k not in split:
                    # a shared output's gradient goes in once, on the last (synchronised) pass
                    surrogate = surrogate + (out[k] * (g if last else torch.zeros_like(g))).sum()
            local = objective.local_terms(out) if hasattr(objective, "local_terms") else {}
            for name, (value, weight) in local.items():
                # a local term is a mean over its items (tokens, pairs) of all micro-batches together
                share = weights[i][name] / sum(w[name] for w in weights)
                surrogate = surrogate + backend.scale(weight * share * value)
                local_sum[name] = local_sum.get(name, 0.0) + share * value.detach()
                loss = loss + weight * share * value.detach()
            backend.backward(surrogate)
    _set_rng_state(after_rng, device)
    return loss.detach(), {**{k: v.detach() for k, v in terms.items()}, **local_sum}, out
