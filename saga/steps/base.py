"""The protocol every step kind follows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

from saga.context import JSON, StepContext


class TaskCaller(Protocol):
    """Runs a task already registered with the worker's Celery app, in this process."""

    def call_task(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> JSON:
        """Run task ``name`` with these arguments and return its value."""
        ...


@runtime_checkable
class StepRunner(Protocol):
    """Runs one step (or compensation) attempt."""

    @property
    def identity(self) -> str:
        """A stable name of the code this runs, part of the definition hash."""
        ...

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Run the attempt and return its JSON result; raise to fail it."""
        ...
