"""Recovery: what no message will ever trigger. Run periodically by the relay.

- a running attempt whose lease expired (its worker died or hung) fails, and is retried under
  its policy;
- a message published long ago whose attempt never started (the broker lost it) is published
  again;
- a run past its deadline stops and compensates;
- a stopping run whose last in-flight step finished without moving it on (a worker died between
  the two transactions) is moved on, and a completed run whose result was never stored gets it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from saga import logs
from saga.app import Saga
from saga.codec import dumps
from saga.core import graph
from saga.errors import UnknownWorkflowError
from saga.transitions import AttemptRef

log = logging.getLogger("saga.sweeper")

_EXPIRED = """
SELECT s.run_id::text AS run_id, s.kind, s.step, s.attempt, s.first_attempt,
       r.workflow, r.version
FROM {steps} s JOIN {runs} r ON r.id = s.run_id
WHERE s.state = 'running' AND s.lease_expires_at < now()
ORDER BY s.lease_expires_at LIMIT :limit
"""
_PAST_DEADLINE = """
SELECT id::text FROM {runs}
WHERE state = 'running' AND deadline_at IS NOT NULL AND deadline_at < now()
ORDER BY deadline_at LIMIT :limit
"""
_UNFINISHED = """
SELECT id::text, workflow, version FROM {runs}
WHERE state = 'completed' AND finished_at IS NULL AND updated_at < now() - interval '2 seconds'
LIMIT :limit
"""
_STALLED = """
SELECT r.id::text FROM {runs} r
WHERE r.state IN ('compensating', 'cancelling') AND r.updated_at < now() - interval '2 seconds'
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
        self._unfinished = t.sql(_UNFINISHED)

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
            rows = conn.execute(self._expired, {"limit": self.batch}).mappings().all()
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
                "message": "the attempt's lease expired: its worker died, hung or overran",
                "attempt": ref.attempt,
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
            rows = self.saga.lifecycle.outbox.republish_stale(
                conn, self.saga.settings.republish_after, self.batch
            )
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
            ids = [r[0] for r in conn.execute(self._past_deadline, {"limit": self.batch})]
        lifecycle = self.saga.lifecycle
        for run_id in ids:
            with self.saga.engine.begin() as conn:
                run = lifecycle.runs.lock(conn, run_id)
                if run is None or run["state"] != "running":
                    continue
                error = {"type": "saga.DeadlineExceeded", "message": "the run's deadline passed"}
                lifecycle.runs.set_state(
                    conn, run_id, ["running"], "compensating", error=dumps(error)
                )
                lifecycle.history.append(conn, run_id, "deadline_exceeded")
                run["state"] = "compensating"
                lifecycle.advance_in_tx(conn, run)
            logs.event(log, logging.WARNING, "run deadline exceeded", run_id=run_id)
        return len(ids)

    def advance_stalled(self) -> int:
        """Move on stopping runs that nothing else will move."""
        with self.saga.engine.connect() as conn:
            ids = [r[0] for r in conn.execute(self._stalled, {"limit": self.batch})]
        for run_id in ids:
            with self.saga.engine.begin() as conn:
                self.saga.lifecycle.advance(conn, run_id)
        # A worker that died between a run's last completion and the statement storing the
        # run's result left a completed run without one.
        with self.saga.engine.connect() as conn:
            unfinished = conn.execute(self._unfinished, {"limit": self.batch}).all()
        for run_id, name, version in unfinished:
            try:
                wf = self.saga.registry.get(name, version)
            except UnknownWorkflowError:
                continue
            with self.saga.engine.begin() as conn:
                self.saga.transitions.finish(conn, run_id, graph.sinks(wf.after_map))
        return len(ids) + len(unfinished)
