"""The Harbor seed's Celery tasks and canvas, as the tests' workers import them: the canvas runs
as plain Celery (a Redis result backend keeps the chord's state, as the seed ran it) and, through
:func:`saga.from_canvas`, as a saga workflow on the same workers.

Configured from the environment: SAGA_DATABASE_URL, SAGA_BROKER_URL (broker and result
backend), SAGA_TEST_QUEUE. Each task records its execution in ``executions`` (``step`` is the
task's name, ``note`` the order), so a test can count what ran for each order.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import Celery, chain, group
from sqlalchemy import text

import saga
from saga import RetryPolicy, Workflow
from saga.celery_adapter import WORKER_SETTINGS

QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
BROKER = os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5")
WORKFLOW = "harbor.canvas_checkout"
PAUSE = 0.05
"""Seconds each task takes, so that an outage finds work in flight."""

app = Celery("saga-canvas", broker=BROKER, backend=BROKER)
app.conf.update(
    WORKER_SETTINGS,
    broker_connection_retry_on_startup=True,
    task_default_queue=QUEUE,
)


def _record(task: str, order: int) -> None:
    with engine.engine.begin() as conn:
        conn.execute(
            text("INSERT INTO executions (kind, step, note) VALUES ('task', :s, :n)"),
            {"s": task, "n": str(order)},
        )
    time.sleep(PAUSE)


@app.task(name="harbor.reserve")  # type: ignore[untyped-decorator]
def reserve(order: int) -> dict[str, Any]:
    """Reserve the order's stock."""
    _record("harbor.reserve", order)
    return {"order": order, "reserved": True}


@app.task(name="harbor.charge")  # type: ignore[untyped-decorator]
def charge(reservation: dict[str, Any]) -> dict[str, Any]:
    """Charge the order the reservation names."""
    _record("harbor.charge", reservation["order"])
    return {"order": reservation["order"], "charge": f"ch_{reservation['order']}"}


@app.task(name="harbor.label")  # type: ignore[untyped-decorator]
def label(charged: dict[str, Any]) -> dict[str, Any]:
    """Print the shipping label of a charged order."""
    _record("harbor.label", charged["order"])
    return {"order": charged["order"], "label": f"lb_{charged['order']}"}


@app.task(name="harbor.receipt")  # type: ignore[untyped-decorator]
def receipt(charged: dict[str, Any]) -> dict[str, Any]:
    """Send the receipt of a charged order."""
    _record("harbor.receipt", charged["order"])
    return {"order": charged["order"], "receipt": charged["charge"]}


@app.task(name="harbor.mark_fulfilled")  # type: ignore[untyped-decorator]
def mark_fulfilled(order: int) -> dict[str, Any]:
    """Mark the order fulfilled."""
    _record("harbor.mark_fulfilled", order)
    return {"order": order, "fulfilled": True}


def checkout(order: int) -> Any:
    """The seed's canvas for one order."""
    return chain(
        reserve.s(order), charge.s(), group(label.s(), receipt.s()), mark_fulfilled.si(order)
    )


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """The canvas as a workflow with its messages on ``queue`` (the test process builds the
    same one as its workers)."""
    retry = RetryPolicy(max_attempts=5, initial_delay=0.2, max_delay=1.0, jitter=0.1)
    converted = saga.from_canvas(WORKFLOW, checkout(0), queue=queue, time_limit=5, retry=retry)
    return [converted.workflow]


registry = saga.Registry(*workflows())
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
saga.install(app, engine)
