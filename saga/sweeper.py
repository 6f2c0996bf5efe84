"""Recovery: what no message will ever trigger. Run periodically by the relay.

- a running attempt whose lease expired (its worker's heartbeat stopped: the process died, or
  the attempt ran far past its time limit) fails with an unknown outcome, and is retried under
  its policy;
- a message published long ago whose attempt never started (the broker lost it) is published
  again, each time later than the last;
- a run past its deadline stops and compensates;
- a stopping run whose last in-flight step finished without moving it on (a worker died between
  the two transactions) is moved on.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from saga import logs
from saga.app import Saga
from saga.core.attempts import AttemptRef
from saga.errors import UnknownWorkflowError

log = logging.getLogger("saga.sweeper")

_EXPIRED = """
SELECT s.run_id::text AS run_id, s.kind, s.step, s.attempt, s.first_attempt,
       r.workflow, r.version
FROM {steps} s JOIN {runs} r ON r.id = s.run_id
WHERE s.state = 'running' AND s.lease_expires_at < now()
  AND r.workflow || ':' || r.version = ANY(:known)
ORDER BY s.lease_expires_at LIMIT :limit
"""
_PAST_DEADLINE = """
SELECT id::text FROM {runs}
WHERE state = 'running' AND deadline_at IS NOT NULL AND deadline_at < now()
  AND workflow || ':' || version = ANY(:known)
ORDER BY deadline_at LIMIT :limit
"""
_STALLED = """
SELECT r.id::text FROM {runs} r
WHERE r.state IN ('compensating', 'cancelling') AND r.updated_at < now() - interval '2 seconds'
  AND r.workflow || ':' || r.version = ANY(:known)
  AND NOT EXISTS (SELECT 1 FROM {steps} s WHERE s.run_id = r.id
                  AND (s.kind = 'compensation' OR s.state = 'running'))
LIMIT :limit
"""


@dataclass
class SweepReport:
    """What one sweep did."""

    leases_expired: int = 0
    republished: int = 0
    deadlines: int = 0
    advanced: int = 0

    @property
    def total(self) -> int:
        """Everything it did."""
        return self.leases_expired + self.republished + self.deadlines + self.advanced


class Sweeper:
    """Finds and repairs what crashes and lost messages left behind."""

    def __init__(self, saga: Saga, batch: int = 100) -> None:
        self.saga = saga
        self.batch = batch
        t = saga.tables
        self._expired = t.sql(_EXPIRED)
        self._past_deadline = t.sql(_PAST_DEADLINE)
        self._stalled = t.sql(_STALLED)

    def _params(self) -> dict[str, object]:
        # Only runs of workflow versions this process has: the others are left to a relay
        # that has them (during a rolling deploy, an old relay meets new runs).
        known = [f"{wf.name}:{wf.version}" for wf in self.saga.registry]
        return {"limit": self.batch, "known": known}

    def sweep(self) -> SweepReport:
        """One pass over every kind of repair."""
        report = SweepReport()
        report.leases_expired = self.expire_leases()
        report.republished = self.republish_lost()
        report.deadlines = self.enforce_deadlines()
        report.advanced = self.advance_stalled()
        return report

    def expire_leases(self) -> int:
        """Fail attempts whose lease ran out; the retry policy decides what comes next."""
        with self.saga.engine.connect() as conn:
            rows = conn.execute(self._expired, self._params()).mappings().all()
        count = 0
        for row in rows:
            ref = AttemptRef(row["run_id"], row["kind"], row["step"], row["attempt"])
            try:
                wf = self.saga.registry.get(row["workflow"], row["version"])
            except UnknownWorkflowError:
                continue
            policy = wf.retry_for(ref.step, ref.kind)
            delay = policy.delay_after(ref.attempt - row["first_attempt"] + 1)
            error = {
                "type": "saga.LeaseExpired",
                "message": "the attempt's lease expired: its worker's heartbeat stopped "
                "(the process died, or the attempt ran far past its time limit)",
                "attempt": ref.attempt,
                "outcome": "unknown",
            }
            with self.saga.engine.begin() as conn:
                outcome = self.saga.lifecycle.fail_attempt_in_tx(conn, ref, error, delay)
                if outcome != "duplicate":
                    self.saga.lifecycle.history.append(
                        conn,
                        ref.run_id,
                        "lease_expired",
                        kind=ref.kind,
                        step=ref.step,
                        attempt=ref.attempt,
                        detail={"outcome": outcome},
                    )
                    count += 1
            logs.event(
                log,
                logging.WARNING,
                "lease expired",
                run_id=ref.run_id,
                workflow=wf.name,
                step=ref.step,
                kind=ref.kind,
                attempt=ref.attempt,
                outcome=outcome,
            )
        return count

    def republish_lost(self) -> int:
        """Publish again the messages no worker claimed long after they were published."""
        with self.saga.engine.begin() as conn:
            rows = self.saga.lifecycle.outbox.republish_due(conn, self.batch)
            for row in rows:
                self.saga.lifecycle.history.append(
                    conn,
                    row["run_id"],
                    "message_republished",
                    kind=row["kind"],
                    step=row["step"],
                    attempt=row["attempt"],
                )
        for row in rows:
            logs.event(log, logging.WARNING, "message never started; publishing again", **row)
        return len(rows)

    def enforce_deadlines(self) -> int:
        """Stop the runs whose deadline passed: they compensate like a permanent failure."""
        with self.saga.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(self._past_deadline, self._params())]
        lifecycle = self.saga.lifecycle
        for run_id in ids:
            with self.saga.engine.begin() as conn:
                run = lifecycle.runs.lock(conn, run_id)
                if run is None or run["state"] != "running":
                    continue
                error = {"type": "saga.DeadlineExceeded", "message": "the run's deadline passed"}
                lifecycle.stop_in_tx(conn, run, "compensating", "deadline_exceeded", error)
            logs.event(log, logging.WARNING, "run deadline exceeded", run_id=run_id)
        return len(ids)

    def advance_stalled(self) -> int:
        """Move on stopping runs that nothing else will move."""
        with self.saga.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(self._stalled, self._params())]
        for run_id in ids:
            with self.saga.engine.begin() as conn:
                self.saga.lifecycle.advance(conn, run_id)
        return len(ids)
