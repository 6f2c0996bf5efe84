"""The Celery app the workers and the relay load: saga wired in, queues routed.

Workers: ``celery -A examples.harbor_checkout.tasks:app worker -Q payments`` (one process
group per queue: ``payments``, ``notifications``, ``harbor``). Relay: ``saga relay --app
examples.harbor_checkout.tasks:app``; it also fires the reconcile schedule
(:mod:`examples.harbor_checkout.reconcile`), so no Celery beat runs.
"""

from __future__ import annotations

from celery import Celery

import saga
from saga.celery_adapter import WORKER_SETTINGS

from . import flow, reconcile
from .config import Config

config = Config.from_env()
__all__ = ["app", "reconcile"]

app = Celery("harbor", broker=config.broker_url)
saga.install(app, flow.engine())
# install() leaves the app's settings alone; these workers serve saga's queues, so they take
# the worker settings saga wants.
app.conf.update(
    WORKER_SETTINGS,
    broker_connection_retry_on_startup=True,
    task_default_queue="harbor",
    worker_hijack_root_logger=True,
)
