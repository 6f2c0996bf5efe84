"""The hot path: claiming a step attempt and completing it, each one SQL statement.

Each statement runs on an autocommit connection, so it is its own transaction: one round trip
and one commit. Both are guarded (``WHERE state = ... AND attempt = ...``): a claim or a
completion for a stale attempt or a finished step changes nothing and comes back as ``None``.

A join's readiness is a counter on its row (``pending_deps``): completions of its last two
dependencies in two processes decrement it under the row lock, so exactly one sees it reach zero
and writes the join's outbox row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.store.base import Tables

LIVE_RUN_STATES = {"step": ["running"], "compensation": ["compensating", "cancelling"]}
"""Run states in which new attempts of each kind may start."""

_CLAIM = """
WITH run AS (
    SELECT id, workflow, version, definition_hash, input, business_key, trace_context
    FROM {runs} WHERE id = :run_id AND state = ANY(:live) FOR KEY SHARE
), claimed AS (
    UPDATE {steps} sr
    SET state = 'running', started_at = now(), due_at = NULL, worker = :worker,
        lease_expires_at = now() + make_interval(secs => :lease)
    FROM run
    WHERE sr.run_id = run.id AND sr.kind = :kind AND sr.step = :step
      AND sr.state = 'ready' AND sr.attempt = :attempt
    RETURNING sr.first_attempt, sr.result
), gone AS (
    -- A relay may still hold the row in its batch: skip it rather than wait; the sweeper
    -- deletes what a claim left behind.
    DELETE FROM {outbox} WHERE id IN (
        SELECT id FROM {outbox}
        WHERE run_id = :run_id AND kind = :kind AND step = :step AND attempt = :attempt
          AND EXISTS (SELECT 1 FROM claimed)
        FOR UPDATE SKIP LOCKED)
), logged AS (
    INSERT INTO {history} (run_id, event, kind, step, attempt)
    SELECT :run_id, 'step_started', :kind, :step, :attempt FROM claimed
)
SELECT run.workflow, run.version, run.definition_hash, run.input, run.business_key,
       run.trace_context, claimed.first_attempt,
       (SELECT coalesce(jsonb_object_agg(d.step, d.result), '{{}}'::jsonb) FROM {steps} d
        WHERE d.run_id = run.id AND d.kind = 'step' AND d.step = ANY(:deps)) AS results,
       (SELECT d.result FROM {steps} d
        WHERE d.run_id = run.id AND d.kind = 'step' AND d.step = :step) AS step_result
FROM run, claimed
"""

_COMPLETE = """
WITH done AS (
    UPDATE {steps}
    SET state = 'completed', result = CAST(:result AS jsonb), error = NULL,
        finished_at = now(), lease_expires_at = NULL
    WHERE run_id = :run_id AND kind = :kind AND step = :step
      AND state = 'running' AND attempt = :attempt
    RETURNING run_id
), run AS (
    UPDATE {runs} r
    SET steps_remaining = r.steps_remaining - CASE WHEN :kind = 'step' THEN 1 ELSE 0 END,
        compensations_remaining =
            r.compensations_remaining - CASE WHEN :kind = 'compensation' THEN 1 ELSE 0 END,
        state = CASE
            WHEN :kind = 'step' AND r.state = 'running' AND r.steps_remaining = 1
                THEN 'completed'
            WHEN :kind = 'compensation' AND r.compensations_remaining = 1
                THEN CASE r.state WHEN 'compensating' THEN 'compensated'
                                  WHEN 'cancelling' THEN 'cancelled' ELSE r.state END
            ELSE r.state END,
        updated_at = now()
    FROM done WHERE r.id = done.run_id
    RETURNING r.state, r.trace_context
), released AS (
    UPDATE {steps} sr
    SET pending_deps = sr.pending_deps - 1,
        state = CASE WHEN sr.pending_deps = 1 THEN 'ready' ELSE 'waiting' END,
        attempt = CASE WHEN sr.pending_deps = 1 THEN sr.attempt + 1 ELSE sr.attempt END
    FROM run
    WHERE sr.run_id = :run_id AND sr.kind = :kind AND sr.step = ANY(:release)
      AND sr.state = 'waiting'
      AND (run.state = ANY(:live)
           OR (:kind = 'compensation' AND run.state = 'compensation_failed'))
    RETURNING sr.step, sr.state, sr.attempt
), queued AS (
    INSERT INTO {outbox} (run_id, kind, step, attempt, queue, priority, time_limit, trace_context,
                          published_at, publish_count)
    SELECT :run_id, :kind, released.step, released.attempt, x.queue, x.priority, x.time_limit,
           run.trace_context, CASE WHEN :eager THEN now() END, CASE WHEN :eager THEN 1 ELSE 0 END
    FROM released
    JOIN jsonb_to_recordset(CAST(:routes AS jsonb))
         AS x(step text, queue text, priority int, time_limit float8) ON x.step = released.step
    CROSS JOIN run
    WHERE released.state = 'ready' AND run.state = ANY(:live)
    RETURNING step, attempt, queue, priority, time_limit
), logged AS (
    INSERT INTO {history} (run_id, event, kind, step, attempt)
    SELECT :run_id, 'step_completed', :kind, :step, :attempt FROM done
    UNION ALL
    SELECT :run_id, 'run_' || run.state, NULL, NULL, NULL FROM run
    WHERE run.state IN ('completed', 'compensated', 'cancelled')
)
SELECT run.state, run.trace_context,
       coalesce((SELECT jsonb_agg(to_jsonb(queued)) FROM queued), '[]'::jsonb) AS queued
FROM run
"""

_FINISH_RESULT = """
UPDATE {runs} SET finished_at = now(), result = (
    SELECT jsonb_object_agg(step, result) FROM {steps}
    WHERE run_id = :run_id AND kind = 'step' AND step = ANY(:sinks))
WHERE id = :run_id
"""

_FINISH = "UPDATE {runs} SET finished_at = now() WHERE id = :run_id"


@dataclass(frozen=True)
class AttemptRef:
    """One attempt of one step (or compensation) of one run: what a message names."""

    run_id: str
    kind: str
    step: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this step of this run."""
        return f"{self.run_id}:{self.kind}:{self.step}"


@dataclass(frozen=True)
class Claim:
    """A claimed attempt and what its code needs."""

    ref: AttemptRef
    workflow: str
    version: int
    definition_hash: str
    input: Any
    business_key: str | None
    trace_context: Any
    first_attempt: int
    results: dict[str, Any]
    step_result: Any


@dataclass(frozen=True)
class Completion:
    """What a completion did: the run's state after it and the messages of the steps it made
    ready (``step``, ``attempt``, ``queue``, ``priority``, ``time_limit``)."""

    run_state: str
    queued: tuple[dict[str, Any], ...] = ()
    trace_context: Any = None

    @property
    def ready(self) -> tuple[str, ...]:
        """The steps this completion made ready."""
        return tuple(m["step"] for m in self.queued)

    @property
    def run_finished(self) -> bool:
        """Whether this completion ended the run."""
        return self.run_state in ("completed", "compensated", "cancelled")


class Transitions:
    """The claim and complete statements for one schema."""

    def __init__(self, tables: Tables) -> None:
        self._claim = tables.sql(_CLAIM)
        self._complete = tables.sql(_COMPLETE)
        self._finish_result = tables.sql(_FINISH_RESULT)
        self._finish = tables.sql(_FINISH)

    def claim(
        self,
        conn: Connection,
        ref: AttemptRef,
        *,
        deps: Sequence[str],
        lease_seconds: float,
        worker: str,
    ) -> Claim | None:
        """Start ``ref`` under a lease; ``None`` if it is stale, taken, or its run has stopped."""
        row = (
            conn.execute(
                self._claim,
                {
                    "run_id": ref.run_id,
                    "kind": ref.kind,
                    "step": ref.step,
                    "attempt": ref.attempt,
                    "live": LIVE_RUN_STATES[ref.kind],
                    "lease": lease_seconds,
                    "worker": worker,
                    "deps": list(deps),
                },
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        return Claim(
            ref=ref,
            workflow=row["workflow"],
            version=row["version"],
            definition_hash=row["definition_hash"],
            input=row["input"],
            business_key=row["business_key"],
            trace_context=row["trace_context"],
            first_attempt=row["first_attempt"],
            results=dict(row["results"]),
            step_result=row["step_result"],
        )

    def finish(self, conn: Connection, run_id: str, sinks: Sequence[str]) -> None:
        """Stamp a completed run's end and store its result: its sink steps' results."""
        conn.execute(self._finish_result, {"run_id": run_id, "sinks": list(sinks)})

    def complete(
        self,
        conn: Connection,
        ref: AttemptRef,
        result_json: str,
        *,
        release: Sequence[str],
        routes: Sequence[dict[str, Any]],
        sinks: Sequence[str],
        eager: bool = False,
    ) -> Completion | None:
        """Record the attempt's result and queue every step it made ready, in one statement.

        ``release`` are the rows whose wait this completion shortens (a step's dependents, or
        the compensations waiting for this one); ``routes`` their queue/priority/time_limit.
        ``None`` means a duplicate: the attempt is stale or already finished. With ``eager``
        the new messages are written as published: the caller publishes them itself after the
        commit (and the sweeper republishes them if it dies first).
        """
        row = (
            conn.execute(
                self._complete,
                {
                    "run_id": ref.run_id,
                    "kind": ref.kind,
                    "step": ref.step,
                    "attempt": ref.attempt,
                    "result": result_json,
                    "release": list(release),
                    "routes": dumps(list(routes)),
                    "live": LIVE_RUN_STATES[ref.kind],
                    "eager": eager,
                },
            )
            .mappings()
            .first()
        )
        if row is None:
            return None
        completion = Completion(
            run_state=row["state"],
            queued=tuple(sorted(row["queued"], key=lambda m: m["step"])),
            trace_context=row["trace_context"],
        )
        if completion.run_state == "completed":
            # A separate statement: its fresh snapshot sees every sink committed before ours.
            self.finish(conn, ref.run_id, sinks)
        elif completion.run_finished:
            conn.execute(self._finish, {"run_id": ref.run_id})
        return completion
