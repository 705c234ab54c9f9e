"""Evaluation tasks by name: one :class:`EvalTask` entry per task, holding its loader, its runner,
the options its loader takes and its aliases.

Each task registers itself from its own module in :mod:`vlp.eval.tasks`; the modules of that package
are imported the first time a task is looked up, so adding a task is adding a module there (see
docs/architecture.md, "Adding an evaluation task").

Legend: N images, D feature dim.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from vlp.eval.datasets import EvalData, EvalDataError
from vlp.eval.extract import image_features

TASK_PACKAGE = "vlp.eval.tasks"  # every module in it not starting with "_" is imported to register its task


class UnknownTaskError(ValueError):
    """A task name that is neither registered nor an alias; the message lists the choices."""


@dataclass
class EvalContext:
    """What every task needs besides the data: where to run and how."""

    env: object
    preprocess: Callable
    batch_size: int = 256
    workers: int = 0
    plots_dir: Path | None = None
    image_policy: object = None  # vlp.data.images.ImagePolicy; None = its defaults


@dataclass(frozen=True)
class EvalTask:
    """One evaluation task.

    ``load(path, **options) -> EvalData`` reads the task's data layouts and raises EvalDataError
    naming the file; ``run(model, tokenizer, data, ctx) -> dict`` scores a model on it, returning
    the same JSON-able metrics on every rank (int and float values also go to logs). ``options``
    names the ``vlp eval`` options (``--classnames`` is ``classnames``) and ``eval.*`` config keys
    that ``load`` takes as keywords; one left empty is not passed. ``note`` follows the name in
    ``vlp eval --help`` (what the task needs).
    """

    name: str
    load: Callable[..., EvalData]
    run: Callable[..., dict]
    options: tuple[str, ...] = ()
    aliases: tuple[str, ...] = ()
    note: str = ""


_TASKS: dict[str, EvalTask] = {}


def register(task: EvalTask) -> EvalTask:
    """Add ``task`` to the registry; returns it. Raises ValueError when its name or an alias is taken."""
    for name in (task.name, *task.aliases):
        owner = next((t for t in _TASKS.values() if name in (t.name, *t.aliases)), None)
        if owner is not None and owner != task:
            raise ValueError(f"eval task name {name!r} is taken by the task {owner.name!r} ({owner.run.__module__})")
    _TASKS[task.name] = task
    return task


def _discover() -> None:
    """Import the modules of TASK_PACKAGE not imported yet: each registers its task when imported.
    Run at every lookup (a listing of a few files), so a module put on the package's ``__path__``
    after the first lookup is found too."""
    package = importlib.import_module(TASK_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__, f"{TASK_PACKAGE}."):
        if not module.name.rpartition(".")[2].startswith("_") and module.name not in sys.modules:
            importlib.import_module(module.name)


def registered_tasks() -> dict[str, EvalTask]:
    """Every registered task by name, sorted by name."""
    _discover()
    return dict(sorted(_TASKS.items()))


def task_names() -> list[str]:
    """The task names, then the aliases, each sorted: what ``--task`` and ``eval.tasks`` accept."""
    tasks = registered_tasks().values()
    return [t.name for t in tasks] + sorted(alias for t in tasks for alias in t.aliases)


def get_task(name: str) -> EvalTask:
    """The task called ``name`` or with the alias ``name``. Raises UnknownTaskError listing the choices."""
    for task in registered_tasks().values():
        if name == task.name or name in task.aliases:
            return task
    raise UnknownTaskError(f"unknown eval task '{name}'; choose from {', '.join(task_names())}")


def load_eval_data(task: str, path: str | os.PathLike | Sequence[str], **options) -> EvalData:
    """Read ``path`` with the loader of ``task`` (a name or an alias); ``options`` go to it.
    Raises EvalDataError for an unknown task (listing the choices), or as the task's loader."""
    try:
        loader = get_task(task).load
    except UnknownTaskError as e:
        raise EvalDataError(str(e)) from None
    return loader(path, **options)


def encode_images(model, data: EvalData, ctx: EvalContext) -> tuple[torch.Tensor, list[int]]:
    """Image features of ``data.images`` under ``ctx``, sharded over ranks: ``(features [N, D],
    kept)``, ``kept`` the sorted indices of the images that were read (the other rows are
    zeros). The images that could not be read are added to ``data.skipped`` by kind."""
    feats_ND, kept, skipped = image_features(
        model,
        data.images,
        ctx.preprocess,
        ctx.env,
        batch_size=ctx.batch_size,
        workers=ctx.workers,
        policy=ctx.image_policy,
    )
    for kind, n in skipped.items():
        data.skipped[kind] = data.skipped.get(kind, 0) + n
    return feats_ND, kept
