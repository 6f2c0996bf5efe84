"""A step that is an existing Celery task, referred to by its registered name."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from saga.context import JSON, StepContext
from saga.steps.base import TaskCaller


def _input_as_kwargs(ctx: StepContext) -> Mapping[str, Any]:
    return dict(ctx.input) if isinstance(ctx.input, Mapping) else {}


def _no_args(ctx: StepContext) -> Sequence[Any]:
    return ()


@dataclass(frozen=True)
class CeleryTaskStep:
    """Runs task ``name`` (already registered on the worker's app) in the worker's process.

    ``args``/``kwargs`` build the task's arguments from the context; by default the run's input
    (a JSON object) is passed as keyword arguments. The task's return value is the step's result.
    """

    name: str
    args: Callable[[StepContext], Sequence[Any]] = _no_args
    kwargs: Callable[[StepContext], Mapping[str, Any]] = _input_as_kwargs

    @property
    def identity(self) -> str:
        """The task's name."""
        return f"celery_task:{self.name}"

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Run the task through the worker's Celery app."""
        if tasks is None:
            raise RuntimeError(f"step {ctx.step!r} runs Celery task {self.name!r}: no Celery app")
        return tasks.call_task(self.name, self.args(ctx), self.kwargs(ctx))
