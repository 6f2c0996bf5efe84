"""A Celery app whose registry has a schedule, as the schedule tests' relay processes import
it: ``test.scheduled`` every ``SAGA_TEST_SCHEDULE_EVERY`` seconds (1 by default), catching
up on every missed slot (so a slow turn of a relay never skips one)."""

from __future__ import annotations

import os

from celery import Celery

import saga
from saga import Schedule, Workflow
from saga.celery_adapter import WORKER_SETTINGS

QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
EVERY = float(os.environ.get("SAGA_TEST_SCHEDULE_EVERY", "1"))


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """The scheduled workflow, its messages on ``queue``."""
    wf = Workflow("test.scheduled", queue=queue)
    wf.add_step("tick", lambda ctx: {"tick": True})
    return [wf]


registry = saga.Registry(*workflows())
registry.add_schedule(Schedule("every-second", "test.scheduled", every=EVERY, catch_up="all"))
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-scheduled", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
