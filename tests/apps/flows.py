"""A Celery app with saga workflows, as the tests' worker and relay processes import it.

Configured from the environment: SAGA_DATABASE_URL, SAGA_BROKER_URL, and SAGA_TEST_* knobs.
Each step records its executions in ``executions`` (created by the tests), so tests can count
how often a step's code ran."""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery
from sqlalchemy import text

import saga
from saga import PermanentError, RetryPolicy, StepContext, Workflow

registry = saga.Registry()
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.1)


def record(ctx: StepContext, note: str = "") -> None:
    """Record one execution of this step's (or compensation's) code."""
    with engine.engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO executions (run_id, kind, step, attempt, idempotency_key, note) "
                "VALUES (:r, :k, :s, :a, :i, :n)"
            ),
            {"r": ctx.run_id, "k": ctx.kind, "s": ctx.step, "a": ctx.attempt,
             "i": ctx.idempotency_key, "n": note},
        )


def _behaviour(ctx: StepContext) -> Any:
    """Per-run knobs in the input: {"sleep": {"step": s}, "fail": {"step": n_times|"always"}}."""
    record(ctx)
    inp = ctx.input if isinstance(ctx.input, dict) else {}
    pause = inp.get("sleep", {}).get(ctx.step)
    if pause:
        time.sleep(pause)
    fail = inp.get("fail", {}).get(ctx.step)
    if fail == "permanent":
        raise PermanentError(f"{ctx.step} declined")
    if fail == "always" or (isinstance(fail, int) and ctx.attempt <= fail):
        raise RuntimeError(f"{ctx.step} failed on attempt {ctx.attempt}")
    return {"step": ctx.step, "attempt": ctx.attempt}


linear = Workflow("test.linear", retry=FAST, time_limit=20)
for _name, _after in (("first", []), ("second", ["first"]), ("third", ["second"])):
    linear.add_step(_name, _behaviour, after=_after)

fan = Workflow("test.fan", retry=FAST, time_limit=20)
fan.add_step("split", _behaviour)
for _i in range(10):
    fan.add_step(f"branch_{_i}", _behaviour, after=["split"])
fan.add_step("join", _behaviour, after=[f"branch_{_i}" for _i in range(10)])

registry.register(linear)
registry.register(fan)

engine = saga.Saga(registry, database_url=os.environ["SAGA_DATABASE_URL"])
app = Celery("saga-tests", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
