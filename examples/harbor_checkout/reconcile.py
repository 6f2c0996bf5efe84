"""The reconcile job: a saga workflow started by a saga schedule (it was a Celery beat task).

Every ``HARBOR_RECONCILE_EVERY`` seconds (5 by default) the relay starts a ``reconcile`` run
whose one step reports the orders still ``pending`` after ``HARBOR_STALE_AFTER`` seconds: it
logs them and keeps a row in ``reconcile_reports`` (an operator would look at their runs with
``saga status order-<id>``). Each slot starts one run, whatever the number of relays, under
the business key ``schedule:reconcile-stale-orders:<slot>``; ``saga schedules`` shows the last
and next slot. Missed slots (no relay ran) are skipped: a report on the current state is what
counts.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from sqlalchemy import text

from saga import Schedule, StepContext, Workflow

from . import flow
from .config import Config

log = logging.getLogger("harbor.reconcile")
config = Config.from_env()

reconcile = Workflow("reconcile", retry=flow.STEP_RETRY, queue="harbor", time_limit=15)


@reconcile.step()
def report_stale_orders(ctx: StepContext) -> dict[str, Any]:
    """Find orders still ``pending`` after ``stale_after`` seconds; log them and keep a
    report row."""
    stale_after = float(ctx.input["stale_after"])
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
            len(ids), stale_after, " ".join(ids[:10]),
        )
    else:
        log.info("reconcile: no order pending for over %.0fs", stale_after)
    return {"stale": len(ids)}


schedule = flow.registry.add_schedule(
    Schedule(
        "reconcile-stale-orders", reconcile, every=config.reconcile_every,
        input={"stale_after": config.stale_after}, catch_up="skip",
    )
)
