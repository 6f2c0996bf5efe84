"""A Celery app whose workflow maps over a list: ``source`` returns ``range(n)``, the map
``each`` runs one instance per item (recording each execution in ``executions``, created by the
tests), at most ``max_parallel`` at a time, and ``join`` returns what it received.

Configured from the environment like ``tests.apps.flows``: ``SAGA_DATABASE_URL``,
``SAGA_BROKER_URL``, ``SAGA_TEST_QUEUE``."""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

import saga
from saga import RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS
from tests.apps.waiting import record

QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
FAST = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=1.0, jitter=0.1)
MAX_PARALLEL = 20


def _source(ctx: StepContext) -> list[int]:
    return list(range(int(ctx.input["n"])))


def _each(ctx: StepContext) -> dict[str, Any]:
    record(ctx)
    return {"index": ctx.index, "double": 2 * ctx.item}


def _join(ctx: StepContext) -> list[Any]:
    record(ctx)
    return list(ctx.results["each"])


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """``m.mapped``: source -> each (a map, ``max_parallel`` 20) -> join."""
    wf = Workflow("m.mapped", retry=FAST, time_limit=20, queue=queue)
    wf.add_step("source", _source)
    wf.map("each", _each, over="source", max_parallel=MAX_PARALLEL)
    wf.add_step("join", _join, after=["each"])
    return [wf]


registry = saga.Registry(*workflows())
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-maps", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
