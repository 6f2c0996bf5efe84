"""A step that is a plain Python function of its context."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from saga.context import JSON, StepContext
from saga.steps.base import TaskCaller


@dataclass(frozen=True)
class FunctionStep:
    """Calls ``fn(ctx)`` in the worker process."""

    fn: Callable[[StepContext], JSON]

    @property
    def identity(self) -> str:
        """``module.qualname`` of the function."""
        return f"function:{self.fn.__module__}.{self.fn.__qualname__}"

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Call the function."""
        return self.fn(ctx)
