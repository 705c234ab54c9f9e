"""ALBEF-style momentum teacher: an EMA copy of the model and queues of its past features.

Legend: B = this rank's batch, W = world size, N = W * B rows enqueued per call, K = queue rows,
D = embedding width.

One training step with distillation (the trainer's order; ALBEF's too):
    t_img_BD, t_txt_BD = teacher.features(image, text)    # before the student's update
    loss = distilled_clip_loss(..., t_img_BD, t_txt_BD, alpha=alpha_at(step, warmup),
                               queue_image=q_img, queue_text=q_txt)  # q_* = teacher.queue()
    loss.backward(); optimizer.step()
    teacher.update(model)                                  # EMA towards the new weights
    teacher.enqueue(t_img_BD, t_txt_BD, group)             # after the loss: a batch is never
                                                           # its own queued negative
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F

from vlp.losses.distributed import group_rank_world

QUEUE_KEY = "loss.distill.queue_size"  # the config key named in error messages


def alpha_at(step: int, warmup_steps: int, alpha: float = 0.4) -> float:
    """Distillation weight at ``step``: ``alpha * min(1, step / warmup_steps)`` (ALBEF ramps it
    over the first epoch); ``warmup_steps == 0`` gives ``alpha`` at once. Raises ValueError for a
    negative ``warmup_steps``."""
    if warmup_steps < 0:
        raise ValueError(f"alpha warm-up must be >= 0 steps, got {warmup_steps}")
    if warmup_steps == 0:
        return alpha
    return alpha * min(1.0, step / warmup_steps)


def _gather_rows(x_BD: torch.Tensor, group) -> torch.Tensor:
    """Every rank's rows in rank order (N x D), without gradients."""
    _, world = group_rank_world(group)
    if world == 1:
        return x_BD
    parts = [torch.empty_like(x_BD) for _ in range(world)]
    dist.all_gather(parts, x_BD.contiguous(), group=group)
    return torch.cat(parts)


class MomentumTeacher(torch.nn.Module):
    """An EMA teacher (a deep copy of ``model``: every tower and projection) with two feature queues.

    The teacher is frozen (``requires_grad=False``), always in eval mode, and must not be given to
    an optimizer or wrapped in DDP: :meth:`update` is its only way to change.

    Queues: ``queue_image`` / ``queue_text`` (K x D, float32) are allocated on the first
    :meth:`enqueue`, where D is first known; until then they are 0 x 0 buffers. This avoids a
    dummy forward at construction (whose inputs depend on the towers). Loading a state dict
    allocates them to the saved shape, so a fresh teacher restores a filled queue exactly.
    ``ptr`` (int64 scalar) is the next row written, ``filled`` the number of valid rows (<= K).
    Rows are written from row 0 and wrap around, so the valid rows are always rows ``[0, filled)``.

    Args:
        model: the student, unwrapped (not DDP): ``encode_image`` / ``encode_text`` give B x D features.
        momentum: m in ``teacher = m * teacher + (1 - m) * student``, in [0, 1].
        queue_size: K, rows per queue; 0 disables the queues.

    Raises:
        ValueError: ``momentum`` outside [0, 1] or a negative ``queue_size``.
    """

    def __init__(self, model: torch.nn.Module, momentum: float = 0.995, queue_size: int = 65536):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        if queue_size < 0:
            raise ValueError(f"{QUEUE_KEY} must be >= 0, got {queue_size}")
        self.momentum, self.queue_size = float(momentum), int(queue_size)
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
            p.grad = None
        device = next(self.model.parameters(), torch.empty(0)).device
        self.register_buffer("queue_image", torch.empty(0, 0, device=device))
        self.register_buffer("queue_text", torch.empty(0, 0, device=device))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long, device=device))
        self.register_buffer("filled", torch.zeros((), dtype=torch.long, device=device))
        self._filled_rows: int | None = 0  # host copy of ``filled`` (None: read it when needed)
        self.eval()

    def train(self, mode: bool = True):
        """Stays in eval mode whatever ``mode`` is: the teacher's features use no dropout."""
        return super().train(False)

    # -- weights ------------------------------------------------------------------------------

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        """EMA step towards ``model`` (the unwrapped student): floating-point parameters become
        ``m * teacher + (1 - m) * student`` (in place), buffers are copied as they are.

        Raises:
            ValueError: the student's parameter or buffer names / shapes differ from the teacher's.
        """
        pairs = _matched(self.model.named_parameters(), model.named_parameters(), "parameter")
        buffers = _matched(self.model.named_buffers(), model.named_buffers(), "buffer")
        teacher = [t for t, s in pairs if t.is_floating_point()]
        student = [s.to(t) for t, s in pairs if t.is_floating_point()]
        if teacher:
            # lerp: t + (1 - m) (s - t); exact when s == t, so frozen weights stay bit-identical
            torch._foreach_lerp_(teacher, student, 1.0 - self.momentum)
        for t, s in buffers:
            t.copy_(s)

    # -- features -----------------------------------------------------------------------------

    @torch.no_grad()
    def features(self, image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The teacher's L2-normalised features ``(img_BD, txt_BD)``, float32, without gradients.

        Uses ``encode_image`` / ``encode_text``, so a CoCa teacher computes no caption logits.
        """
        img_BD = self.model.encode_image(image, normalize=True)
        txt_BD = self.model.encode_text(text, normalize=True)
        return F.normalize(img_BD.float(), dim=-1), F.normalize(txt_BD.float(), dim=-1)

    # -- queues -------------------------------------------------------------------------------

    def check_global_batch(self, global_batch: int) -> None:
        """ALBEF enqueues whole global batches into a queue of K rows, so K must be a multiple of
        the global batch. Raises ValueError (one line, naming the settings) otherwise."""
        if global_batch < 1 or self.queue_size % global_batch:
            raise ValueError(
                f"{QUEUE_KEY}={self.queue_size} must be a multiple of the global batch {global_batch} "
                "(data.batch_size x world size x train.accum_steps)"
            )

    @torch.no_grad()
    def enqueue(self, img_BD: torch.Tensor, txt_BD: torch.Tensor, group=None) -> None:
        """Append every rank's teacher features (all-gathered in rank order: N = W * B rows) at
        ``ptr``, wrapping around at K; every rank then holds the same queues. A collective: every
        rank of ``group`` must call it with the same B. No-op when ``queue_size`` is 0.

        Raises:
            ValueError: shapes are not B x D alike, N > K, or D differs from the queue's.
        """
        if img_BD.dim() != 2 or img_BD.shape != txt_BD.shape:
            raise ValueError(f"enqueue needs two B x D tensors, got {tuple(img_BD.shape)} and {tuple(txt_BD.shape)}")
        if self.queue_size == 0:
            return
        img_ND = _gather_rows(img_BD.detach().float(), group)
        txt_ND = _gather_rows(txt_BD.detach().float(), group)
        n, dim = img_ND.shape
        if n > self.queue_size:
            raise ValueError(f"cannot enqueue {n} rows (global batch) into a queue of {QUEUE_KEY}={self.queue_size}")
        if self.queue_image.numel() == 0:
            self._allocate(self.queue_size, dim)
        elif self.queue_image.shape[1] != dim:
            raise ValueError(f"enqueue of {dim}-d features into a queue of {self.queue_image.shape[1]}-d features")
        filled = min(self._filled_count() + n, self.queue_size)
        device = self.queue_image.device
        rows_N = (self.ptr + torch.arange(n, device=device)) % self.queue_size  # tensor math: no host sync
        self.queue_image.index_copy_(0, rows_N, img_ND.to(device))
        self.queue_text.index_copy_(0, rows_N, txt_ND.to(device))
        self.ptr.copy_((self.ptr + n) % self.queue_size)
        self.filled.clamp_(max=self.queue_size - n).add_(n)  # min(filled + n, K), on the device
        self._filled_rows = filled

    def queue(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The valid rows ``(img_KD, txt_KD)`` with K = ``filled``, in storage order (rows 0..filled-1;
        once the queue has wrapped, this is not arrival order; the loss does not depend on it).
        0 x 0 tensors before the first enqueue. Views of the buffers: do not modify them."""
        k = self._filled_count()
        return self.queue_image[:k], self.queue_text[:k]

    def _filled_count(self) -> int:
        if self._filled_rows is None:
            self._filled_rows = int(self.filled)
        return self._filled_rows

    def _allocate(self, rows: int, dim: int) -> None:
        for name in ("queue_image", "queue_text"):
            old = getattr(self, name)
            setattr(self, name, torch.zeros(rows, dim, dtype=torch.float32, device=old.device))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # the queues are allocated lazily: take the saved shape (K x D, or 0 x 0 if never filled)
        saved = state_dict.get(prefix + "queue_image")
        if saved is not None and saved.shape != self.queue_image.shape:
            if saved.numel() and saved.shape[0] != self.queue_size:
                errors.append(
                    f"the saved momentum queue has {saved.shape[0]} rows but {QUEUE_KEY}={self.queue_size}; "
                    "resume with the same queue size"
                )
            else:
                self._allocate(*saved.shape)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._filled_rows = None


def _matched(teacher_items, student_items, kind: str) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Pair the teacher's and the student's named tensors; ValueError on any name or shape mismatch."""
    teacher, student = dict(teacher_items), dict(student_items)
    if teacher.keys() != student.keys():
        extra, missing = sorted(student.keys() - teacher.keys()), sorted(teacher.keys() - student.keys())
        raise ValueError(
            f"the student's {kind}s do not match the momentum teacher's: unexpected {extra[:3]}, missing "
            f"{missing[:3]} (pass the unwrapped model the teacher was built from)"
        )
    for name, t in teacher.items():
        if t.shape != student[name].shape:
            raise ValueError(
                f"the student's {kind} {name} has shape {tuple(student[name].shape)}, "
                f"the momentum teacher's {tuple(t.shape)}"
            )
    return [(t, student[name]) for name, t in teacher.items()]
