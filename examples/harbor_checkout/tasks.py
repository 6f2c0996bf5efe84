"""The Celery app the workers, the relay and beat load: saga wired in, queues routed, and the
periodic reconcile job.

Workers: ``celery -A examples.harbor_checkout.tasks:app worker -Q payments`` (one process
group per queue: ``payments``, ``notifications``, ``harbor``). Relay: ``saga relay --app
examples.harbor_checkout.tasks:app``. Beat: ``celery -A examples.harbor_checkout.tasks:app
beat``.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from celery import Celery
from sqlalchemy import text

import saga
from saga.celery_adapter import WORKER_SETTINGS

from . import flow
from .config import Config

log = logging.getLogger("harbor.reconcile")
config = Config.from_env()

app = Celery("harbor", broker=config.broker_url)
saga.install(app, flow.engine())
# install() leaves the app's settings alone; these workers serve saga's queues (and harbor's
# own tasks), so they take the worker settings saga wants.
app.conf.update(
    WORKER_SETTINGS,
    broker_connection_retry_on_startup=True,
    task_default_queue="harbor",
    task_routes={"harbor.reconcile": {"queue": "harbor"}},
    beat_schedule={
        "reconcile-stale-orders": {
            "task": "harbor.reconcile",
            "schedule": config.reconcile_every,
            "options": {"expires": config.reconcile_every * 2},
        }
    },
    worker_hijack_root_logger=True,
)


@app.task(name="harbor.reconcile", ignore_result=True)  # type: ignore[untyped-decorator]
def reconcile() -> dict[str, Any]:
    """Find orders still ``pending`` after ``HARBOR_STALE_AFTER`` seconds; log them and keep a
    report row (an operator would look at their runs with ``saga status <order id>``)."""
    stale_after = config.stale_after
    with flow.db().begin() as conn:
        ids = [
            str(r[0])
            for r in conn.execute(
                text(
                    "SELECT id FROM orders WHERE status = 'pending' "
                    "AND created_at < clock_timestamp() - make_interval(secs => :s) "
                    "ORDER BY created_at LIMIT 1000"
                ),
                {"s": stale_after},
            )
        ]
        conn.execute(
            text(
                "INSERT INTO reconcile_reports (stale_after, stale_count, order_ids) "
                "VALUES (:s, :n, CAST(:ids AS jsonb))"
            ),
            {"s": stale_after, "n": len(ids), "ids": json.dumps(ids)},
        )
    if ids:
        log.warning(
            "reconcile: %d order(s) pending for over %.0fs, oldest first: %s",
            len(ids),
            stale_after,
            " ".join(ids[:10]),
        )
    else:
        log.info("reconcile: no order pending for over %.0fs", stale_after)
    return {"stale": len(ids)}
