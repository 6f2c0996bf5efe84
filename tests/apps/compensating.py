"""A Celery app whose workflows undo what they did, for the failure tests' workers and relay.

Configured from the environment: SAGA_DATABASE_URL and SAGA_BROKER_URL (importing this module
without them works, so tests can use its registry; nothing connects until a step runs).

Every execution of a step's or a compensation's code is recorded in ``executions`` (a row
noted ``start`` when the code begins; compensations add a row noted ``end`` when they succeed),
and ``control`` holds switches the tests flip while a run waits. Both tables are created by the
tests. Behaviour is chosen per run through its input:

- ``fail``: ``{step: n | "always" | "permanent" | "control"}`` fail the step's first ``n``
  attempts, every attempt, once for good (:class:`~saga.PermanentError`), or for good while
  ``control`` has the row ``fail:<step>``;
- ``comp_fail``: the same for the step's compensation (``control`` row ``comp_fail:<step>``);
- ``sleep`` / ``comp_sleep``: ``{step: seconds}`` to sleep in the step or its compensation;
- ``comp_sleep_first``: ``{step: seconds}`` to sleep in the compensation's first attempt only.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from sqlalchemy import text

import saga
from saga import PermanentError, RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS

EXECUTIONS_DDL = (
    "CREATE TABLE executions (id bigserial primary key, run_id uuid, kind text, step text, "
    "attempt int, idempotency_key text, note text, at timestamptz default clock_timestamp())"
)
CONTROL_DDL = "CREATE TABLE control (key text primary key, value text)"

registry = saga.Registry()

QUICK = RetryPolicy(max_attempts=3, initial_delay=0.1, max_delay=0.5, jitter=0.0)
"""Three attempts, a fraction of a second apart."""
TWICE = RetryPolicy(max_attempts=2, initial_delay=0.1, max_delay=0.5, jitter=0.0)
SLOW_BACKOFF = RetryPolicy(max_attempts=3, initial_delay=6.0, max_delay=6.0, jitter=0.0)
"""A retry six seconds after a failure: long enough to kill a worker in between."""


def record(ctx: StepContext, note: str = "start") -> None:
    """Record one execution of this step's (or compensation's) code."""
    with engine.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executions (run_id, kind, step, attempt, idempotency_key, note) "
                "VALUES (:r, :k, :s, :a, :i, :n)"
            ),
            {
                "r": ctx.run_id,
                "k": ctx.kind,
                "s": ctx.step,
                "a": ctx.attempt,
                "i": ctx.idempotency_key,
                "n": note,
            },
        )


def _switched_on(key: str) -> bool:
    with engine.engine.connect() as conn:
        return (
            conn.execute(text("SELECT 1 FROM control WHERE key = :k"), {"k": key}).first()
            is not None
        )


def _knobs(ctx: StepContext) -> dict[str, Any]:
    return ctx.input if isinstance(ctx.input, dict) else {}


def _maybe_fail(ctx: StepContext, how: Any, switch: str) -> None:
    what = "compensation of " + ctx.step if ctx.is_compensation else ctx.step
    if how == "permanent":
        raise PermanentError(f"{what} declined")
    if how == "control" and _switched_on(switch):
        raise PermanentError(f"{what} declined while {switch!r} is set")
    if how == "always" or (isinstance(how, int) and ctx.attempt <= how):
        raise RuntimeError(f"{what} failed on attempt {ctx.attempt}")


def act(ctx: StepContext) -> Any:
    """A step: record, maybe sleep, maybe fail, else return what it did."""
    record(ctx)
    knobs = _knobs(ctx)
    pause = knobs.get("sleep", {}).get(ctx.step)
    if pause:
        time.sleep(pause)
    _maybe_fail(ctx, knobs.get("fail", {}).get(ctx.step), f"fail:{ctx.step}")
    return {"step": ctx.step, "attempt": ctx.attempt}


def undo(ctx: StepContext) -> Any:
    """A compensation: record, maybe sleep, maybe fail, else record its end."""
    record(ctx)
    knobs = _knobs(ctx)
    pause = knobs.get("comp_sleep", {}).get(ctx.step)
    if ctx.attempt == 1:
        pause = knobs.get("comp_sleep_first", {}).get(ctx.step, pause)
    if pause:
        time.sleep(pause)
    _maybe_fail(ctx, knobs.get("comp_fail", {}).get(ctx.step), f"comp_fail:{ctx.step}")
    record(ctx, "end")
    return {"undone": ctx.step, "of": ctx.step_result}


# a → (b, c) → d, everything undoable.
diamond = Workflow("comp.diamond", retry=QUICK, time_limit=20)
diamond.add_step("a", act, compensate=undo)
diamond.add_step("b", act, after=["a"], compensate=undo)
diamond.add_step("c", act, after=["a"], compensate=undo)
diamond.add_step("d", act, after=["b", "c"], compensate=undo)

# first → second → third, everything undoable; compensations get three attempts too.
linear = Workflow("comp.linear", retry=QUICK, time_limit=5)
linear.add_step("first", act, compensate=undo, compensation_retry=QUICK)
linear.add_step("second", act, after=["first"], compensate=undo, compensation_retry=QUICK)
linear.add_step("third", act, after=["second"], compensate=undo, compensation_retry=QUICK)

# before → overrun, whose one-second time limit its sleep overruns.
overrun = Workflow("comp.overrun", retry=TWICE, time_limit=10)
overrun.add_step("before", act, compensate=undo)
overrun.add_step("overrun", act, after=["before"], time_limit=1)

# reserve → charge, retried six seconds after a failure.
backoff = Workflow("comp.backoff", retry=QUICK, time_limit=10)
backoff.add_step("reserve", act, compensate=undo)
backoff.add_step("charge", act, after=["reserve"], compensate=undo, retry=SLOW_BACKOFF)

# book → hold → finish, with a two-second deadline on the whole run.
deadline = Workflow("comp.deadline", retry=QUICK, time_limit=10, deadline=2)
deadline.add_step("book", act, compensate=undo)
deadline.add_step("hold", act, after=["book"], compensate=undo)
deadline.add_step("finish", act, after=["hold"], compensate=undo)

for _wf in (diamond, linear, overrun, backoff, deadline):
    registry.register(_wf)

engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery(
    "saga-compensating", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/6")
)
saga.install(app, engine)
# What saga wants of a worker serving its queues (install() leaves the app's settings alone).
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
