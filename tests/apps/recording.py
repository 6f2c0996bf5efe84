"""Recording executions of step code in the tests' ``executions`` table."""

from __future__ import annotations

from sqlalchemy import text

import saga
from saga import StepContext


def record(engine: saga.Saga, ctx: StepContext) -> None:
    """Record one execution of this step's (or compensation's) code, in its own transaction."""
    with engine.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO executions (run_id, kind, step, attempt, idempotency_key) "
                 "VALUES (:r, :k, :s, :a, :i)"),
            {"r": ctx.run_id, "k": ctx.kind, "s": ctx.step, "a": ctx.attempt,
             "i": ctx.idempotency_key},
        )
