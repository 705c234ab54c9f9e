"""The evaluation tasks, one module each: a module registers its task's :class:`~vlp.eval.registry.EvalTask`
when imported, and :mod:`vlp.eval.registry` imports every module here (but ``_``-prefixed ones) the
first time a task is looked up. Adding a task is adding a module; docs/architecture.md says what it holds.
"""

from vlp.eval.registry import EvalContext  # where the trainer and the demos have always imported it from

__all__ = ["EvalContext"]
