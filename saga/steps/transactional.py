"""A step whose database writes commit in the same transaction as its completion.

The worker opens a transaction on saga's own database, hands its connection to the step as
``ctx.connection``, runs the step, records the completion (and claims a chained step) on that
same connection, and commits once: the step's writes and its completion happen together or not
at all, so they happen exactly once even if the worker dies (DBOS calls these transactions).

Limits, which the worker checks where it can: the writes must go to the database saga uses
(through ``ctx.connection``); the step must not commit or roll back that transaction (checked:
the attempt fails if it did); it should make no outside calls (they are not undone with the
transaction and would run again on a retry); its statements are bounded by the step's time
limit (``statement_timeout``), and it holds its row locks until the completion commits.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from saga.context import JSON, StepContext
from saga.steps.base import TaskCaller

F = TypeVar("F", bound=Callable[..., object])
_MARK = "__saga_transactional__"


def transactional(fn: F) -> F:
    """Mark a step function as transactional (see this module); use it under ``@wf.step``::

        @checkout.step(after=[charge_payment])
        @saga.transactional
        def record_sale(ctx: StepContext) -> None:
            ctx.connection.execute(text("INSERT INTO sales ..."), {...})
    """
    setattr(fn, _MARK, True)
    return fn


def is_transactional(fn: object) -> bool:
    """Whether ``fn`` was marked with :func:`transactional`."""
    return getattr(fn, _MARK, False) is True


@dataclass(frozen=True)
class TransactionalStep:
    """Calls ``fn(ctx)`` inside the transaction that records its completion; ``ctx.connection``
    is that transaction's SQLAlchemy connection."""

    fn: Callable[[StepContext], JSON]
    transactional: bool = True

    @property
    def identity(self) -> str:
        """``transactional:module.qualname`` of the function."""
        return f"transactional:{self.fn.__module__}.{self.fn.__qualname__}"

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Call the function (the worker has put the transaction's connection on ``ctx``)."""
        if ctx.connection is None:
            raise RuntimeError(f"transactional step {ctx.step!r} was run without a transaction")
        return self.fn(ctx)
