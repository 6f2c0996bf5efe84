"""A Celery app whose workflows wait: a durable sleep and a signal wait, between steps that
record their executions in ``executions`` (created by the tests).

Configured from the environment like ``tests.apps.flows``: ``SAGA_DATABASE_URL``,
``SAGA_BROKER_URL``, ``SAGA_TEST_QUEUE``. A run's input ``{"seconds": s}`` is how long its
sleep lasts (it sleeps until ``started + s``, a time taken from the first step's result)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from typing import Any

from celery import Celery

import saga
from saga import RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS
from tests.apps import recording

QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.1)


def record(ctx: StepContext) -> None:
    """Record one execution of this step's code."""
    recording.record(engine, ctx)


def _begin(ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    due = datetime.now(UTC) + timedelta(seconds=float(ctx.input.get("seconds", 1)))
    return {"due": due.isoformat()}


def _end(ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    return {"after": sorted(ctx.results)}


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """``w.sleepy`` (begin -> nap until begin's time -> end) and ``w.signalled`` (begin ->
    paid, a wait for the signal ``payment_captured`` -> end)."""
    sleepy = Workflow("w.sleepy", retry=FAST, time_limit=20, queue=queue)
    sleepy.add_step("begin", _begin)
    sleepy.sleep("nap", until=lambda ctx: datetime.fromisoformat(ctx.results["begin"]["due"]),
                 after=["begin"])
    sleepy.add_step("end", _end, after=["nap"])
    signalled = Workflow("w.signalled", retry=FAST, time_limit=20, queue=queue)
    signalled.add_step("begin", _begin)
    signalled.wait_for_signal("paid", signal="payment_captured", timeout=600, after=["begin"])
    signalled.add_step("end", _end, after=["paid"])
    return [sleepy, signalled]


registry = saga.Registry(*workflows())
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-waits", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
