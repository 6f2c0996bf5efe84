"""A Celery app whose workflows start child runs, with steps that record their executions in
``executions`` (created by the tests).

Configured from the environment like ``tests.apps.flows``: ``SAGA_DATABASE_URL``,
``SAGA_BROKER_URL``, ``SAGA_TEST_QUEUE``. ``n.order``'s input ``{"fail": true}`` makes its
child's step fail for good, ``{"decline": true}`` its own last step (after its child
completed)."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import saga
from saga import PermanentError, RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS
from tests.apps import recording

QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
FAST = RetryPolicy(max_attempts=2, initial_delay=0.2, max_delay=1.0, jitter=0.1)


def record(ctx: StepContext) -> None:
    """Record one execution of this step's (or compensation's) code."""
    recording.record(engine, ctx)


def _step(ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    if ctx.step == "reserve" and ctx.input.get("fail"):
        raise PermanentError("out of stock")
    if ctx.step == "ship" and ctx.input.get("decline"):
        raise PermanentError("no carrier")
    return {"done": ctx.step}


def _undo(ctx: StepContext) -> None:
    record(ctx)


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """``n.order`` (order -> stock, a child ``n.stock`` run -> ship) and ``n.waiting`` (a
    child ``n.slow`` run, whose step waits for a signal that never comes)."""
    stock = Workflow("n.stock", retry=FAST, time_limit=20, queue=queue)
    stock.add_step("reserve", _step, compensate=_undo)
    order = Workflow("n.order", retry=FAST, time_limit=20, queue=queue)
    order.add_step("order", _step, compensate=_undo)
    order.child("stock", workflow=stock, after=["order"])
    order.add_step("ship", _step, after=["stock"])
    slow = Workflow("n.slow", retry=FAST, time_limit=20, queue=queue)
    slow.add_step("begin", _step, compensate=_undo)
    slow.wait_for_signal("go", signal="go", timeout=600, after=["begin"])
    waiting = Workflow("n.waiting", retry=FAST, time_limit=20, queue=queue)
    waiting.child("slow", workflow=slow)
    return [order, waiting]


registry = saga.Registry(*workflows())
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-nested", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
