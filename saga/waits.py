"""Suspending, waking and signalling the steps that wait (:mod:`saga.steps.waits`).

A wait step is claimed like any step; then, instead of running code, the worker suspends its
row (``running --suspended--> suspended``, with ``wake_at``) and lets go. What wakes it
(``suspended --woken--> running``) completes or fails it in the same transaction, through the
same completing statement as every step (:meth:`saga.transitions.Transitions.complete`), so
the steps after it become ready through the outbox as usual:

- the relay, once ``wake_at`` has passed: a sleep completes; a signal wait times out (it fails,
  or completes with its default);
- a signal (:meth:`Waits.signal`), in the sender's transaction.

A signal and a wait that starts at the same moment cannot miss each other: both lock the run's
row first, so either the wait sees the stored signal, or the signal sees the suspended row.
Everything is in PostgreSQL: a timer or a wait outlives restarts of every process and of the
broker.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection

from saga import logs
from saga.codec import dumps, encode, encode_result
from saga.context import StepContext
from saga.core import graph
from saga.core.attempts import AttemptRef
from saga.definition import _NAME, Workflow
from saga.errors import InputError, SignalRefusedError, UnknownWorkflowError
from saga.steps.waits import Sleep, WaitForSignal, WaitStep
from saga.transitions import Completion

if TYPE_CHECKING:  # saga.app makes a Waits: no import at run time
    from saga.app import Saga

log = logging.getLogger("saga.waits")

_SIGNAL_OF = "SELECT payload FROM {signals} WHERE run_id = :run_id AND name = :name"
_SUSPEND = """
UPDATE {steps}
SET state = 'suspended', lease_expires_at = NULL, signal = :signal,
    wake_at = coalesce(CAST(:until AS timestamptz), now() + make_interval(secs => :seconds))
WHERE run_id = :run_id AND kind = 'step' AND step = :step AND state = 'running'
  AND attempt = :attempt AND worker = :token
RETURNING wake_at
"""
_WAKE = """
WITH old AS (
    SELECT sr.run_id, sr.step, sr.wake_at, sr.signal FROM {steps} sr JOIN {runs} r
    ON r.id = sr.run_id AND r.state = 'running'
    WHERE sr.run_id = :run_id AND sr.kind = 'step' AND sr.state = 'suspended'
      AND (sr.step = :step OR CAST(:step AS text) IS NULL)
      AND (sr.signal = :signal OR CAST(:signal AS text) IS NULL)
      AND (sr.wake_at <= now() + make_interval(secs => :ahead) OR NOT :due_only)
    FOR UPDATE OF sr
)
UPDATE {steps} sr
SET state = 'running', worker = :token, wake_at = NULL, signal = NULL,
    lease_expires_at = now() + interval '60 seconds'
FROM old WHERE sr.run_id = old.run_id AND sr.kind = 'step' AND sr.step = old.step
RETURNING sr.step, sr.attempt, sr.first_attempt, old.wake_at, old.signal
"""
_DUE = """
SELECT s.run_id::text AS run_id, s.step, r.workflow, r.version
FROM {steps} s JOIN {runs} r ON r.id = s.run_id
WHERE s.state = 'suspended' AND s.wake_at <= now() + make_interval(secs => :ahead)
  AND r.workflow || ':' || r.version = ANY(:known)
ORDER BY s.wake_at LIMIT :limit
"""
_NEXT_WAKE = """
SELECT extract(epoch FROM min(wake_at) - now()) FROM {steps} WHERE state = 'suspended'
"""
_STORE_SIGNAL = """
INSERT INTO {signals} (run_id, name, payload) VALUES (:run_id, :name, CAST(:payload AS jsonb))
ON CONFLICT (run_id, name) DO NOTHING RETURNING received_at
"""
_SHIFT = """
UPDATE {steps} SET wake_at = wake_at - make_interval(secs => :seconds)
WHERE state = 'suspended'
"""


@dataclass(frozen=True)
class Suspension:
    """What beginning a wait did: ``result`` (stored JSON) when it could complete at once (its
    signal had come, its time had passed), else ``wake_at``, when the relay wakes it."""

    result: str | None = None
    wake_at: datetime | None = None


class Waits:
    """The statements of waits, signals and timers, for one engine."""

    def __init__(self, saga: Saga) -> None:
        self.saga = saga
        t = saga.tables
        self._signal_of = t.sql(_SIGNAL_OF)
        self._suspend = t.sql(_SUSPEND)
        self._wake = t.sql(_WAKE)
        self._due = t.sql(_DUE)
        self.next_wake_sql = _NEXT_WAKE.format(steps=t.steps)
        """Seconds to the next wake (negative if one is due), for the relay's sleep."""
        self._store_signal = t.sql(_STORE_SIGNAL)
        self._shift = t.sql(_SHIFT)

    # -- a worker begins a wait --------------------------------------------------------------

    def begin(
        self, ref: AttemptRef, token: str, runner: WaitStep, ctx: StepContext
    ) -> Suspension:
        """Suspend the claimed attempt ``ref`` (claimed under ``token``) until its time or its
        signal; or say it can complete at once. Raises what ``until`` raises."""
        until: datetime | None = None
        seconds: float | None = None
        signal: str | None = None
        if isinstance(runner, WaitForSignal):
            seconds, signal = runner.timeout, runner.signal
        elif isinstance(runner, Sleep):
            seconds = runner.seconds
            if runner.until is not None:
                until = runner.wake_at(ctx, datetime.now().astimezone())
                if until <= datetime.now().astimezone():  # its time has passed already
                    return Suspension(result=dumps({"woke_at": until.isoformat()}))
        lifecycle = self.saga.lifecycle

        def suspend(conn: Connection) -> Suspension:
            lifecycle.runs.lock(conn, ref.run_id)  # against a signal sent right now
            if signal is not None:
                found = conn.execute(self._signal_of, {"run_id": ref.run_id, "name": signal})
                row = found.first()
                if row is not None:
                    return Suspension(result=dumps(row[0]))
            wake_at = self.suspend(conn, ref, token, seconds=seconds, until=until, signal=signal)
            if wake_at is None:
                return Suspension()  # stale: the attempt is no longer ours
            detail = {"wake_at": wake_at.isoformat(), "signal": signal}
            lifecycle.history.append(conn, ref.run_id, "step_suspended", kind="step",
                                     step=ref.step, attempt=ref.attempt, detail=detail)
            return Suspension(wake_at=wake_at)

        return self.saga.in_transaction(suspend)

    def suspend(
        self, conn: Connection, ref: AttemptRef, token: str, *, seconds: float | None,
        until: datetime | None, signal: str | None,
    ) -> datetime | None:
        """The guarded move ``running --suspended--> suspended`` of the attempt ``ref`` claimed
        under ``token``, to wake at ``until`` or ``seconds`` from now; its ``wake_at``, or
        ``None`` if the attempt is not that running one."""
        params = {"run_id": ref.run_id, "step": ref.step, "attempt": ref.attempt, "token": token}
        params |= {"until": until, "seconds": seconds or 0.0, "signal": signal}
        row = conn.execute(self._suspend, params).first()
        return None if row is None else row[0]

    def wake(self, conn: Connection, run_id: str, token: str, step: str) -> list[str]:
        """The guarded move ``suspended --woken--> running`` of a step of a running run, under
        ``token``, whatever its wake time (the caller then completes or fails it); the steps
        it moved."""
        return [r["step"] for r in self._take(conn, run_id, token, step=step)]

    # -- waking ------------------------------------------------------------------------------

    def fire_due(self, limit: int = 100, ahead: float = 0.0) -> int:
        """Wake the suspended steps whose time has come (``ahead`` seconds early, for tests):
        a sleep completes, a signal wait times out. How many woke."""
        known = [f"{wf.name}:{wf.version}" for wf in self.saga.registry]
        with self.saga.engine.connect() as conn:
            due = conn.execute(
                self._due, {"ahead": ahead, "known": known, "limit": limit}
            ).mappings().all()
        woke = 0
        for row in due:
            try:
                wf = self.saga.registry.get(row["workflow"], row["version"])
            except UnknownWorkflowError:
                continue
            run_id, step = str(row["run_id"]), str(row["step"])

            def wake(c: Connection, w: Workflow = wf, r: str = run_id, s: str = step) -> int:
                return self._wake_in_tx(c, w, r, ahead, step=s)

            try:
                woke += self.saga.in_transaction(wake)
            except Exception as exc:  # one bad row must not keep the others asleep
                logs.event(log, logging.ERROR, f"could not wake a step: {logs.describe(exc)}",
                           run_id=run_id, workflow=wf.name, step=step)
        return woke

    def shift(self, seconds: float) -> None:
        """Bring every suspended step's wake time ``seconds`` nearer (a test's fake clock)."""
        with self.saga.engine.begin() as conn:
            conn.execute(self._shift, {"seconds": seconds})

    def _wake_in_tx(
        self, conn: Connection, wf: Workflow, run_id: str, ahead: float, *, step: str
    ) -> int:
        token = f"timer:{uuid.uuid4().hex[:12]}"
        rows = self._take(conn, run_id, token, step=step, due_only=True, ahead=ahead)
        for row in rows:
            ref = AttemptRef(run_id, "step", row["step"], row["attempt"])
            runner = wf[ref.step].runner
            if isinstance(runner, WaitForSignal):
                self._time_out(conn, wf, ref, row, runner, token)
            else:
                result = {"woke_at": row["wake_at"].isoformat()}
                self.complete_woken(conn, wf, ref, dumps(result), token, "timer")
        return len(rows)

    def _time_out(
        self, conn: Connection, wf: Workflow, ref: AttemptRef, row: Any, runner: WaitForSignal,
        token: str,
    ) -> None:
        if runner.has_default:
            limit = self.saga.settings.max_result_bytes
            self.complete_woken(conn, wf, ref, encode_result(runner.default, limit=limit), token,
                           "timeout")
            return
        policy = wf.retry_for(ref.step, "step")
        delay = policy.delay_after(ref.attempt - row["first_attempt"] + 1)
        error = {
            "type": "saga.SignalTimeout",
            "message": f"no signal {runner.signal!r} within {runner.timeout:g}s",
            "attempt": ref.attempt,
        }
        outcome = self.saga.lifecycle.fail_attempt_in_tx(conn, ref, error, delay)
        self._log(ref, wf, "signal wait timed out", outcome=outcome)

    def _take(
        self, conn: Connection, run_id: str, token: str, *, step: str | None = None,
        signal: str | None = None, due_only: bool = False, ahead: float = 0.0,
    ) -> Sequence[Any]:
        params: dict[str, Any] = {"run_id": run_id, "step": step, "signal": signal}
        params["token"] = token
        params |= {"due_only": due_only, "ahead": ahead}
        return conn.execute(self._wake, params).mappings().all()

    def complete_woken(
        self, conn: Connection, wf: Workflow, ref: AttemptRef, result_json: str, token: str,
        by: str, **detail: Any,
    ) -> Completion | None:
        """Complete the woken attempt ``ref`` (a step, or a compensation: what waits for it is
        released as a worker's completion would) with ``result_json`` under ``token``, and
        say in the history what woke it (``by``, with ``detail``)."""
        if ref.kind == "step":
            release = graph.dependents(wf.after_map)[ref.step]
        else:
            release = tuple(sorted(graph.ancestors(wf.after_map, ref.step)))
        self.saga.lifecycle.history.append(
            conn, ref.run_id, "step_woken", kind=ref.kind, step=ref.step, attempt=ref.attempt,
            detail={"by": by, **detail},
        )
        done = self.saga.transitions.complete(
            conn, ref, result_json, token=token, release=release,
            routes=[wf.route(s) for s in release], sink=ref.kind == "step" and not release,
            republish_after=self.saga.settings.republish_after,
            definition=(wf.name, wf.version, wf.definition_hash),
        )
        self._log(ref, wf, f"woken by {by}")
        return done

    @staticmethod
    def _log(ref: AttemptRef, wf: Workflow, message: str, **fields: Any) -> None:
        logs.event(log, logging.INFO, message, run_id=ref.run_id, workflow=wf.name,
                   step=ref.step, attempt=ref.attempt, **fields)

    # -- signals -----------------------------------------------------------------------------

    def signal(self, conn: Connection, run_ref: str, name: str, payload: Any) -> str:
        """Send the signal ``name`` with ``payload`` to the run whose id or business key is
        ``run_ref``, in the caller's transaction (see :meth:`saga.Saga.signal`); returns
        ``delivered``, ``stored`` or ``duplicate``."""
        if not isinstance(name, str) or not _NAME.match(name):
            raise InputError("-", "signal", f"the name must match {_NAME.pattern}, got {name!r}")
        lifecycle = self.saga.lifecycle
        found = lifecycle.runs.find_one(conn, run_ref)
        run_id = str(found["id"])
        wf = self.saga.registry.get(found["workflow"], found["version"])
        payload_json = encode(
            payload, workflow=wf.name, field="payload", limit=self.saga.settings.max_input_bytes
        )
        run = lifecycle.runs.lock(conn, run_id)
        assert run is not None
        if run["state"] != "running":
            raise SignalRefusedError(run_id, run["state"], name)
        stored = conn.execute(
            self._store_signal, {"run_id": run_id, "name": name, "payload": payload_json}
        ).first()
        if stored is None:
            return "duplicate"
        lifecycle.history.append(conn, run_id, "signal_received", detail={"signal": name})
        token = f"signal:{uuid.uuid4().hex[:12]}"
        woken = self._take(conn, run_id, token, signal=name)
        for row in woken:
            ref = AttemptRef(run_id, "step", row["step"], row["attempt"])
            self.complete_woken(conn, wf, ref, payload_json, token, "signal")
        return "delivered" if woken else "stored"
