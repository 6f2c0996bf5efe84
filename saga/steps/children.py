"""A step that runs another workflow as a child run (:mod:`saga.children`).

A worker claims a child step like any other; instead of running code it starts the child run
and suspends the step's row in one transaction (the child's business key names the attempt,
so a re-delivered attempt never starts a second child). The relay wakes the step when the
child ends: it completes with the child's result, or fails if the child did not complete.
Every child step has an implicit compensation, :class:`UndoChild`: it compensates a completed
child (or cancels a live one) and waits for it to end.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from saga.context import JSON, StepContext
from saga.steps.base import TaskCaller


class _Suspends:
    """A runner the executor hands to :mod:`saga.children` instead of running it."""

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Never called: the executor starts (or undoes) the child run instead."""
        raise RuntimeError(f"step {ctx.step!r} runs a child workflow; it is not run by a worker")


@dataclass(frozen=True)
class ChildStep(_Suspends):
    """Runs the workflow ``workflow`` (its ``version``, or the newest registered one when the
    attempt starts) with ``input(ctx)`` as its input (without one: the parent run's input);
    its result is the child run's result."""

    workflow: str
    version: int | None = None
    input: Callable[[StepContext], Any] | None = None
    definition: object = field(default=None, compare=False, repr=False)
    """The child's ``Workflow`` when it was given as one (the registry registers it too)."""

    @property
    def identity(self) -> str:
        """``child:<workflow>``; the hash keeps the kind (``child``, and that it has an undo),
        and like a task's name the child's workflow may change under running runs (the next
        attempt starts the new one)."""
        return f"child:{self.workflow}"

    def input_of(self, ctx: StepContext) -> Any:
        """The child run's input for the attempt ``ctx``."""
        return ctx.input if self.input is None else self.input(ctx)


@dataclass(frozen=True)
class UndoChild(_Suspends):
    """The compensation of a child step: compensates the child run if it completed, cancels it
    if it still runs, then waits for it to end (a child that ended otherwise has nothing left
    to undo)."""

    @property
    def identity(self) -> str:
        """``undo-child:``."""
        return "undo-child:"
