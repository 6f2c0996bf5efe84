"""A worker process's heartbeat: it renews the leases of the attempts the process is running.

A claim takes a lease of ``heartbeat_timeout`` seconds. While the attempt runs, a daemon thread
of the process renews it every third of that, in one statement for all the process's attempts,
fenced by attempt number and claim token (as procrastinate's worker heartbeat and Temporal's
activity heartbeat are), on a connection of its own so that a busy pool cannot starve it. So a
live attempt keeps its lease however long it runs within its time limit, and a dead process's
attempts are retried ``heartbeat_timeout`` after its last beat, whatever their time limit.

The heartbeat stops renewing an attempt at its time limit plus ``lease_grace``: one that never
came back from its time limit (a thread stuck in a C call) is given up then, retried, and its
late completion refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg

from saga import logs
from saga.codec import dumps
from saga.core.attempts import AttemptRef

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.heartbeat")

_RENEW = """
UPDATE {steps} sr SET lease_expires_at = now() + make_interval(secs => %(lease)s)
FROM jsonb_to_recordset(CAST(%(rows)s AS jsonb))
     AS x(run_id uuid, kind text, step text, attempt int, token text)
WHERE sr.run_id = x.run_id AND sr.kind = x.kind AND sr.step = x.step
  AND sr.attempt = x.attempt AND sr.worker = x.token AND sr.state = 'running'
RETURNING x.token
"""


@dataclass(eq=False)
class Lease:
    """One running attempt's lease, as its process keeps it."""

    ref: AttemptRef
    token: str
    renew_until: float
    """Monotonic time after which the lease is no longer renewed."""
    lost: bool = field(default=False)
    """The row said the lease was no longer this attempt's (it expired and the step moved on):
    its outcome will be refused."""


class Heartbeat:
    """Renews the leases of one process's running attempts."""

    def __init__(self, saga: Saga) -> None:
        self._saga = saga
        self.timeout = saga.settings.heartbeat_timeout
        self.interval = self.timeout / 3
        self._sql = _RENEW.format(steps=saga.tables.steps)
        self._reset()
        os.register_at_fork(after_in_child=self._reset)

    def _reset(self) -> None:
        # A forked child has none of its parent's threads, connections or attempts.
        self._lock = threading.Lock()
        self._leases: set[Lease] = set()
        self._thread: threading.Thread | None = None
        self._conn: psycopg.Connection[Any] | None = None
        self._failing = False

    @contextlib.contextmanager
    def keep(self, ref: AttemptRef, token: str, renew_for: float) -> Iterator[Lease]:
        """Renew the claimed attempt's lease while the block runs, for ``renew_for`` seconds
        at most."""
        lease = Lease(ref, token, time.monotonic() + renew_for)
        with self._lock:
            self._leases.add(lease)
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="saga-heartbeat", daemon=True
                )
                self._thread.start()
        try:
            yield lease
        finally:
            with self._lock:
                self._leases.discard(lease)

    def _run(self) -> None:
        while True:
            time.sleep(self.interval)
            try:
                self.beat()
            except Exception as exc:  # the database may be away: beat again next time
                self._close()
                if not self._failing:
                    self._failing = True
                    logs.event(log, logging.WARNING, f"heartbeat failed: {logs.describe(exc)}")

    def beat(self) -> int:
        """Renew every lease still to renew, in one statement; how many were renewed."""
        now = time.monotonic()
        with self._lock:
            due = [lease for lease in self._leases if lease.renew_until > now]
        if not due:
            return 0
        rows = [
            {
                "run_id": lease.ref.run_id,
                "kind": lease.ref.kind,
                "step": lease.ref.step,
                "attempt": lease.ref.attempt,
                "token": lease.token,
            }
            for lease in due
        ]
        if self._conn is None or self._conn.closed:
            self._conn = self._saga.connect_raw()
        params = {"lease": self.timeout, "rows": dumps(rows)}
        renewed = {r[0] for r in self._conn.execute(self._sql, params)}
        self._failing = False
        with self._lock:  # an attempt that ended meanwhile was not renewed: it is not lost
            ended = [lease for lease in due if lease not in self._leases]
        for lease in due:
            if lease.token not in renewed and not lease.lost and lease not in ended:
                lease.lost = True
                logs.event(
                    log, logging.WARNING, "lease lost: the attempt's outcome will be refused",
                    run_id=lease.ref.run_id, step=lease.ref.step, kind=lease.ref.kind,
                    attempt=lease.ref.attempt,
                )
        return len(renewed)

    def _close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(psycopg.Error):
                self._conn.close()
            self._conn = None
