"""The hot path: claiming a step attempt and completing it, each one SQL statement.

Each statement runs on an autocommit connection, so it is its own transaction: one round trip
and one commit. Both are guarded (``WHERE state = ... AND attempt = ...``, the moves
``claimed`` and ``completed`` of :mod:`saga.core.states`): a claim or a completion for a stale
attempt or a finished step changes nothing.

Both can be replayed after a lost reply. A claim carries a token of the execution that made it,
so running it again finds its own claim; a completion that finds its attempt already completed
under the same token returns the messages it made ready, so that they still go out at once.

A join's readiness is a counter on its row (``pending_deps``): completions of its last two
dependencies in two processes decrement it under the row lock, so exactly one sees it reach zero
and writes the join's outbox row. A run's result (its sink steps' results) is gathered on its
row by the sinks' completions, under the same lock, so the completion that ends the run stores
the whole result and ``finished_at`` in its own commit.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.core.attempts import AttemptRef, outcome_of
from saga.core.states import LIVE_RUN_STATES
from saga.store.base import Statement, Tables

_CLAIM = """
WITH run AS (
    SELECT id, workflow, version, definition_hash, state, input, business_key, trace_context
    FROM {runs} WHERE id = :run_id FOR KEY SHARE
), claimed AS (
    UPDATE {steps} sr
    SET state = 'running', started_at = now(), due_at = NULL, worker = :token,
        lease_expires_at = now() + make_interval(secs => :lease)
    FROM run
    WHERE sr.run_id = run.id AND sr.kind = :kind AND sr.step = :step
      AND sr.state = 'ready' AND sr.attempt = :attempt
      AND run.state = ANY(:live) AND run.workflow = :workflow AND run.version = :version
      AND run.definition_hash = :hash
    RETURNING sr.first_attempt, sr.item
), mine AS (
    SELECT first_attempt, item FROM claimed
    UNION ALL
    -- The same claim run again after its reply was lost: it is ours already.
    SELECT sr.first_attempt, sr.item FROM {steps} sr, run
    WHERE NOT EXISTS (SELECT 1 FROM claimed)
      AND sr.run_id = run.id AND sr.kind = :kind AND sr.step = :step
      AND sr.state = 'running' AND sr.attempt = :attempt AND sr.worker = :token
), gone AS (
    -- A relay may be taking the row into its batch right now: skip it rather than wait; the
    -- sweeper deletes what a claim left behind.
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
       run.trace_context, mine.first_attempt, mine.item,
       CASE WHEN mine.first_attempt IS NOT NULL THEN
           (SELECT coalesce(jsonb_object_agg(d.step, d.result), '{{}}'::jsonb) FROM {steps} d
            WHERE d.run_id = run.id AND d.kind = 'step' AND d.step = ANY(:deps))
       END AS results,
       CASE WHEN mine.first_attempt IS NOT NULL AND :kind = 'compensation' THEN
           (SELECT jsonb_build_object('state', d.state, 'result', d.result, 'error', d.error,
                                      'item', d.item)
            FROM {steps} d WHERE d.run_id = run.id AND d.kind = 'step' AND d.step = :step)
       END AS undone
FROM run LEFT JOIN mine ON true
"""

# The uuid casts: a parameter in a SELECT list is typed text when it is bound client-side
# (Django's cursor, for a signal sent on Django's connection).
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
    SET steps_remaining = r.steps_remaining - (:kind = 'step')::int,
        compensations_remaining = r.compensations_remaining - (:kind = 'compensation')::int,
        state = CASE
            WHEN :kind = 'step' AND r.state = 'running' AND r.steps_remaining = 1
                THEN 'completed'
            WHEN :kind = 'compensation' AND r.compensations_remaining = 1
                THEN CASE r.state WHEN 'compensating' THEN 'compensated'
                                  WHEN 'cancelling' THEN 'cancelled' ELSE r.state END
            ELSE r.state END,
        -- A sink's result joins the run's; only while the run runs (a stopped run has none).
        result = CASE WHEN :sink AND :kind = 'step' AND r.state = 'running'
            THEN coalesce(r.result, '{{}}'::jsonb)
                 || jsonb_build_object(CAST(:step AS text), CAST(:result AS jsonb))
            ELSE r.result END,
        finished_at = CASE
            WHEN :kind = 'step' AND r.state = 'running' AND r.steps_remaining = 1 THEN now()
            WHEN :kind = 'compensation' AND r.compensations_remaining = 1
                 AND r.state IN ('compensating', 'cancelling') THEN now()
            ELSE r.finished_at END,
        updated_at = now()
    FROM done WHERE r.id = done.run_id
    RETURNING r.state, r.trace_context, r.input, r.business_key
), released AS (
    -- A step that becomes ready here is left 'ready' for its message, but the one the caller
    -- runs next in-process (:follow): that one is claimed here at once, for the caller's claim
    -- token, as a claim would (the caller reads a join's other inputs afterwards).
    UPDATE {steps} sr
    SET pending_deps = sr.pending_deps - 1,
        state = CASE WHEN sr.pending_deps > 1 THEN 'waiting'
                     WHEN sr.step = :follow THEN 'running' ELSE 'ready' END,
        attempt = sr.attempt + (sr.pending_deps = 1)::int,
        started_at = CASE WHEN sr.pending_deps = 1 AND sr.step = :follow THEN now()
                          ELSE sr.started_at END,
        worker = CASE WHEN sr.pending_deps = 1 AND sr.step = :follow THEN :follow_token
                      ELSE sr.worker END,
        lease_expires_at = CASE WHEN sr.pending_deps = 1 AND sr.step = :follow
                                THEN now() + make_interval(secs => :lease) END,
        due_at = CASE WHEN sr.pending_deps = 1 AND sr.step = :follow THEN NULL
                      ELSE sr.due_at END
    FROM run
    WHERE sr.run_id = :run_id AND sr.kind = :kind AND sr.step = ANY(:release)
      AND sr.state = 'waiting'
      AND (run.state = ANY(:live)
           OR (:kind = 'compensation' AND run.state = 'compensation_failed'))
    RETURNING sr.step, sr.state, sr.attempt, sr.first_attempt
), queued AS (
    INSERT INTO {outbox} (run_id, kind, step, attempt, queue, priority, time_limit, trace_context,
                          published_at, publish_count, republish_at)
    SELECT CAST(:run_id AS uuid), :kind, released.step, released.attempt, x.queue, x.priority,
           x.time_limit, run.trace_context, CASE WHEN :eager THEN now() END,
           CASE WHEN :eager THEN 1 ELSE 0 END,
           CASE WHEN :eager THEN now() + make_interval(secs => :republish_after) END
    FROM released
    JOIN jsonb_to_recordset(CAST(:routes AS jsonb))
         AS x(step text, queue text, priority int, time_limit float8) ON x.step = released.step
    CROSS JOIN run
    WHERE released.state = 'ready' AND run.state = ANY(:live)
    RETURNING step, attempt, queue, priority, time_limit
), logged AS (
    INSERT INTO {history} (run_id, event, kind, step, attempt)
    SELECT CAST(:run_id AS uuid), 'step_completed', :kind, :step, :attempt FROM done
    UNION ALL
    SELECT CAST(:run_id AS uuid), 'step_started', :kind, released.step, released.attempt
    FROM released
    WHERE released.state = 'running'
    UNION ALL
    SELECT CAST(:run_id AS uuid), 'run_' || run.state, NULL, NULL, NULL FROM run
    WHERE run.state IN ('completed', 'compensated', 'cancelled')
)
SELECT run.state, run.trace_context, run.business_key,
       CASE WHEN EXISTS (SELECT 1 FROM released WHERE state = 'running')
            THEN run.input END AS input,
       (SELECT to_jsonb(f) FROM (SELECT step, attempt, first_attempt FROM released
                                WHERE state = 'running') f) AS followed,
       coalesce((SELECT jsonb_agg(to_jsonb(queued)) FROM queued), '[]'::jsonb) AS queued
FROM run
"""

_REPLAY_COMPLETION = """
SELECT r.state, r.trace_context,
       coalesce((SELECT jsonb_agg(jsonb_build_object(
                    'step', o.step, 'attempt', o.attempt, 'queue', o.queue,
                    'priority', o.priority, 'time_limit', o.time_limit))
                 FROM {outbox} o
                 WHERE o.run_id = sr.run_id AND o.kind = sr.kind AND o.step = ANY(:release)),
                '[]'::jsonb) AS queued,
       (SELECT jsonb_build_object('step', c.step, 'attempt', c.attempt) FROM {steps} c
        WHERE c.run_id = sr.run_id AND c.kind = sr.kind AND c.step = ANY(:release)
          AND c.state = 'running' AND c.worker = :follow_token LIMIT 1) AS followed
FROM {steps} sr JOIN {runs} r ON r.id = sr.run_id
WHERE sr.run_id = :run_id AND sr.kind = :kind AND sr.step = :step
  AND sr.state = 'completed' AND sr.attempt = :attempt AND sr.worker = :token
"""


@dataclass(frozen=True)
class Claim:
    """What a claim found: the run (always) and, when ``claimed``, what the attempt's code
    needs. An unclaimed attempt is stale, taken, of a stopped run, or of a run whose
    definition (``workflow``, ``version``, ``definition_hash``) is not the one asked for."""

    ref: AttemptRef
    workflow: str
    version: int
    definition_hash: str
    input: Any
    business_key: str | None
    trace_context: Any
    claimed: bool
    first_attempt: int = 1
    results: dict[str, Any] | None = None
    step_result: Any = None
    outcome: str | None = None
    """For a compensation: what is known of the step it undoes (see ``saga.core.attempts``)."""
    item: Any = None
    """For an instance of a map (or its compensation): its item."""


@dataclass(frozen=True)
class Completion:
    """What a completion did: the run's state after it and the messages of the steps it made
    ready (``step``, ``attempt``, ``queue``, ``priority``, ``time_limit``)."""

    run_state: str
    queued: tuple[dict[str, Any], ...] = ()
    trace_context: Any = None
    replayed: bool = False
    """The completion had committed before (its reply was lost): nothing changed now."""
    followed: AttemptRef | None = None
    """The step this completion made ready and claimed for the caller (``follow``): it has no
    outbox row; the caller runs it next."""
    follow_claim: Claim | None = None
    """That step's claim, when its only dependency is the completed step (its inputs are
    known); otherwise the caller reads it (:meth:`Transitions.claim` with the same token)."""

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
        self._claim = Statement.of(tables.sql(_CLAIM))
        self._complete = Statement.of(tables.sql(_COMPLETE))
        self._replay_completion = Statement.of(tables.sql(_REPLAY_COMPLETION))

    def claim(
        self,
        conn: Connection,
        ref: AttemptRef,
        *,
        workflow: str,
        version: int,
        definition_hash: str,
        deps: Sequence[str],
        lease_seconds: float,
        token: str,
    ) -> Claim | None:
        """Start ``ref`` under a lease of ``lease_seconds`` (renewed by the worker's heartbeat)
        if its run is live and has this definition; ``None`` when there is no such run."""
        row = self._claim.first(
            conn,
            {
                "run_id": ref.run_id,
                "kind": ref.kind,
                "step": ref.step,
                "attempt": ref.attempt,
                "live": list(LIVE_RUN_STATES[ref.kind]),
                "workflow": workflow,
                "version": version,
                "hash": definition_hash,
                "lease": lease_seconds,
                "token": token,
                "deps": list(deps),
            },
        )
        if row is None:
            return None
        claimed = row["first_attempt"] is not None
        undone = row["undone"] or {}
        return Claim(
            ref=ref,
            workflow=row["workflow"],
            version=row["version"],
            definition_hash=row["definition_hash"],
            input=row["input"],
            business_key=row["business_key"],
            trace_context=row["trace_context"],
            claimed=claimed,
            first_attempt=row["first_attempt"] or 1,
            results=dict(row["results"]) if claimed else None,
            step_result=undone.get("result"),
            outcome=outcome_of(undone["state"], undone.get("error")) if undone else None,
            item=undone.get("item") if undone else row["item"],
        )

    def complete(
        self,
        conn: Connection,
        ref: AttemptRef,
        result_json: str,
        *,
        token: str,
        release: Sequence[str],
        routes: Sequence[dict[str, Any]],
        sink: bool,
        eager: bool = False,
        republish_after: float = 300.0,
        follow: str | None = None,
        follow_token: str = "",
        follow_alone: bool = False,
        lease_seconds: float = 15.0,
        definition: tuple[str, int, str] = ("", 0, ""),
    ) -> Completion | None:
        """Record the attempt's result and queue every step it made ready, in one statement.

        ``release`` are the rows whose wait this completion shortens (a step's dependents, or
        the compensations waiting for this one); ``routes`` their queue/priority/time_limit;
        ``sink`` whether the step's result is part of the run's. With ``eager`` the new
        messages are written as published: the caller publishes them itself after the commit
        (the sweeper publishes them again after ``republish_after`` if it died first).
        ``follow`` names the step the caller would run next in-process: if this completion
        makes it ready, the same statement claims it, under ``follow_token`` and a lease of
        ``lease_seconds`` (:attr:`Completion.followed`); with ``follow_alone`` (its only
        dependency is this step) its claim is built here, with ``definition`` (the run's
        workflow, version and definition hash). A replay finds it by its token.
        ``None`` means a duplicate: the attempt is stale or was finished by someone else; a
        completion of this very attempt whose reply was lost is replayed instead.
        """
        params = {
            "run_id": ref.run_id,
            "kind": ref.kind,
            "step": ref.step,
            "attempt": ref.attempt,
            "result": result_json,
            "release": list(release),
            "routes": dumps(list(routes)),
            "live": list(LIVE_RUN_STATES[ref.kind]),
            "sink": sink,
            "eager": eager,
            "republish_after": republish_after,
            "follow": follow,
            "follow_token": follow_token,
            "lease": lease_seconds,
        }
        row = self._complete.first(conn, params)
        if row is None:
            return self.replay_completion(
                conn, ref, token=token, release=release, follow_token=follow_token
            )
        followed = _ref(ref, row["followed"])
        follow_claim = None
        if followed is not None and follow_alone:
            follow_claim = Claim(
                ref=followed,
                workflow=definition[0],
                version=definition[1],
                definition_hash=definition[2],
                input=row["input"],
                business_key=row["business_key"],
                trace_context=row["trace_context"],
                claimed=True,
                first_attempt=row["followed"]["first_attempt"],
                results={ref.step: json.loads(result_json)},
            )
        return Completion(
            run_state=row["state"],
            queued=tuple(sorted(row["queued"], key=lambda m: m["step"])),
            trace_context=row["trace_context"],
            followed=followed,
            follow_claim=follow_claim,
        )

    def replay_completion(
        self,
        conn: Connection,
        ref: AttemptRef,
        *,
        token: str,
        release: Sequence[str],
        follow_token: str = "",
    ) -> Completion | None:
        """What the completion of ``ref`` under claim ``token`` did, if it committed (its
        reply may have been lost); ``None`` if it did not. Changes nothing."""
        replay = {"run_id": ref.run_id, "kind": ref.kind, "step": ref.step, "attempt": ref.attempt}
        replay |= {"release": list(release), "token": token, "follow_token": follow_token}
        again = self._replay_completion.first(conn, replay)
        if again is None:
            return None
        return Completion(
            run_state=again["state"],
            queued=tuple(sorted(again["queued"], key=lambda m: m["step"])),
            trace_context=again["trace_context"],
            replayed=True,
            followed=_ref(ref, again["followed"]),
        )


def _ref(completed: AttemptRef, followed: dict[str, Any] | None) -> AttemptRef | None:
    if followed is None:
        return None
    return AttemptRef(completed.run_id, completed.kind, followed["step"], followed["attempt"])
