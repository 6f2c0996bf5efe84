"""What the relay does besides publishing, a little at a time from its loop: being seen in the
registry of live processes, folding the run-count deltas, and (optionally) retention.

:meth:`Housekeeping.tick` is called on every turn of the relay's loop and is cheap when nothing
is due: each chore has an interval, and a database error is logged and tried again later.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from saga import logs
from saga.handles import forget_stale_waiters_in_tx
from saga.presence import Presence
from saga.retention import Retention
from saga.store import counts

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.housekeeping")

FOLD_INTERVAL = 5.0
"""Seconds between folds of ``run_count_deltas`` into ``run_counts``."""
RETENTION_INTERVAL = 60.0
"""Seconds between retention batches while nothing is left to prune."""
WAITERS_INTERVAL = 600.0
"""Seconds between removals of waiters whose process died while waiting."""
RETENTION_BUSY_INTERVAL = 0.5
"""Seconds between retention batches while a backlog remains (a batch came back full)."""


class Housekeeping:
    """The relay's periodic chores for one engine."""

    def __init__(
        self,
        saga: Saga,
        *,
        retention: float | None = None,
        batch_size: int = 200,
        presence: Presence | None = None,
    ) -> None:
        self.saga = saga
        self.presence = presence or Presence(saga, "relay")
        self.retention = (
            None
            if retention is None
            else Retention(saga.engine, saga.tables, retention, batch_size=batch_size)
        )
        self._due: dict[str, float] = {}

    def start(self) -> None:
        """Register the relay."""
        self.presence.register()

    def _is_due(self, chore: str, now: float) -> bool:
        return now >= self._due.get(chore, 0.0)

    def tick(self) -> None:
        """Do whatever chore is due; never raises on a database error."""
        now = time.monotonic()
        self.presence.beat()
        try:
            if self._is_due("fold", now):
                self._due["fold"] = now + FOLD_INTERVAL
                with self.saga.engine.begin() as conn:
                    counts.fold_in_tx(conn, self.saga.tables)
            if self._is_due("waiters", now):
                self._due["waiters"] = now + WAITERS_INTERVAL
                with self.saga.engine.begin() as conn:
                    forget_stale_waiters_in_tx(conn, self.saga.tables)
            if self.retention is not None and self._is_due("retention", now):
                full = self.retention.step() >= self.retention.batch_size
                pause = RETENTION_BUSY_INTERVAL if full else RETENTION_INTERVAL
                self._due["retention"] = time.monotonic() + pause
        except DBAPIError as exc:
            logs.event(log, logging.WARNING, f"housekeeping failed: {type(exc).__name__}")

    def stop(self) -> None:
        """Remove the relay from the registry (a clean exit)."""
        self.presence.remove()
