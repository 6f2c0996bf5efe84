"""Steps that wait without holding a worker: a durable sleep and a wait for a named signal.

A worker claims such a step like any other, works out when it wakes, and suspends its row
(``suspended``, with ``wake_at``) in one short transaction; nothing runs while it waits. The
relay wakes it when ``wake_at`` passes (:mod:`saga.waits`); a signal
(:meth:`saga.Saga.signal`) wakes a signal wait at once, in the sender's transaction.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from saga.context import JSON, StepContext
from saga.steps.base import TaskCaller

NO_DEFAULT: Any = object()
"""A signal wait without a default: its timeout fails the attempt."""


class WaitStep:
    """Base of the step kinds the executor suspends instead of running (see this module)."""

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Never called: the executor suspends a wait step instead of running it."""
        raise RuntimeError(f"step {ctx.step!r} waits; it is not run by a worker")


@dataclass(frozen=True)
class Sleep(WaitStep):
    """Sleeps ``seconds`` after it starts, or until the time ``until(ctx)`` returns (an aware
    ``datetime``, taken from the run's input or an earlier step's result). Its result is
    ``{"woke_at": <ISO time it was due>}``."""

    seconds: float | None = None
    until: Callable[[StepContext], datetime] | None = None

    @property
    def identity(self) -> str:
        """``sleep``: the duration and the time are policies, not the graph's shape."""
        return "sleep:"

    def wake_at(self, ctx: StepContext, now: datetime) -> datetime:
        """When the sleep started at ``now`` ends (an error of the step's, if ``until`` fails
        or returns no aware ``datetime``)."""
        if self.until is None:
            return now + timedelta(seconds=self.seconds or 0.0)
        due = self.until(ctx)
        if not isinstance(due, datetime) or due.tzinfo is None:
            raise ValueError(
                f"sleep {ctx.step!r}: until() must return an aware datetime, got {due!r}"
            )
        return due


@dataclass(frozen=True)
class WaitForSignal(WaitStep):
    """Waits for the signal ``signal`` sent to the run (one sent before the wait began counts);
    its result is the signal's payload. Past ``timeout`` seconds the attempt fails (retried
    under the step's policy, then the run compensates), or, with a ``default``, the step
    completes with it."""

    signal: str
    timeout: float
    default: Any = NO_DEFAULT

    @property
    def identity(self) -> str:
        """``signal:<name>``."""
        return f"signal:{self.signal}"

    @property
    def has_default(self) -> bool:
        """Whether the timeout completes the step with :attr:`default` instead of failing."""
        return self.default is not NO_DEFAULT
