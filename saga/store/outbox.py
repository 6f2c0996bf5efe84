"""Statements on the ``outbox`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.core.attempts import AttemptRef
from saga.store.base import Row, Tables

_ENQUEUE = """
INSERT INTO {outbox}
    (run_id, kind, step, attempt, queue, priority, time_limit, available_at, trace_context)
SELECT :run_id, :kind, x.step, x.attempt, x.queue, x.priority, x.time_limit,
       now() + make_interval(secs => coalesce(x.delay, 0)), CAST(:trace AS jsonb)
FROM jsonb_to_recordset(CAST(:rows AS jsonb))
     AS x(step text, attempt int, queue text, priority int, time_limit float8, delay float8)
"""
_UNPUBLISH = """
UPDATE {outbox} SET published_at = NULL
WHERE run_id = :run_id AND kind = :kind AND step = ANY(:steps) AND published_at IS NOT NULL
"""
_DROP_UNSTARTED = "DELETE FROM {outbox} WHERE run_id = :run_id AND kind = :kind"
_TAKE_BATCH = """
WITH batch AS (
    SELECT o.id, o.available_at FROM {outbox} o
    WHERE o.published_at IS NULL AND o.available_at <= now() + make_interval(secs => :lookahead)
    ORDER BY o.available_at, o.id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
), taken AS (
    -- Held for this relay by pushing the rows' due time ahead: a relay that dies mid-batch
    -- leaves them due again then, and no lock outlives this statement.
    UPDATE {outbox} o SET available_at = now() + make_interval(secs => :hold)
    FROM batch WHERE o.id = batch.id
    RETURNING o.id, o.available_at
)
SELECT o.id, taken.available_at AS held_until, o.run_id::text AS run_id, r.workflow,
       r.version, r.definition_hash, o.kind, o.step, o.attempt, o.queue, o.priority,
       o.time_limit, o.publish_count, o.trace_context,
       EXTRACT(EPOCH FROM (batch.available_at - now()))::float8 AS countdown,
       EXTRACT(EPOCH FROM (now() - o.created_at))::float8 AS age
FROM batch JOIN taken ON taken.id = batch.id JOIN {outbox} o ON o.id = batch.id
     JOIN {runs} r ON r.id = o.run_id
ORDER BY batch.available_at, batch.id
"""
_MARK_PUBLISHED = """
UPDATE {outbox} SET published_at = now(), publish_count = publish_count + 1,
    republish_at = now() + make_interval(secs => least(
        :republish_after * power(:backoff, publish_count), :republish_after * :cap))
WHERE id = ANY(:ids) AND published_at IS NULL AND available_at = :held
"""
_RELEASE = """
UPDATE {outbox} SET available_at = now()
WHERE id = ANY(:ids) AND published_at IS NULL AND available_at = :held
"""
_NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM (min(available_at) - now())) FROM {outbox} WHERE published_at IS NULL
"""
_REPUBLISH_DUE = """
WITH due AS (
    SELECT o.id, EXISTS (
        SELECT 1 FROM {steps} s WHERE s.run_id = o.run_id AND s.kind = o.kind
        AND s.step = o.step AND s.attempt = o.attempt AND s.state = 'ready') AS waiting
    FROM {outbox} o
    WHERE o.published_at IS NOT NULL AND o.republish_at < now()
    ORDER BY o.republish_at LIMIT :limit FOR UPDATE SKIP LOCKED
), gone AS (
    -- Its attempt started (a claim that found the row held by a relay leaves it behind).
    DELETE FROM {outbox} o USING due WHERE o.id = due.id AND NOT due.waiting
)
UPDATE {outbox} o SET published_at = NULL, available_at = now()
FROM due WHERE o.id = due.id AND due.waiting
RETURNING o.run_id::text, o.kind, o.step, o.attempt, o.publish_count
"""
_DEFER = """
UPDATE {outbox}
SET published_at = NULL, deferrals = deferrals + 1,
    available_at = now() + make_interval(secs => least(:cap, :base * power(2, deferrals)))
WHERE run_id = :run_id AND kind = :kind AND step = :step AND attempt = :attempt
RETURNING deferrals
"""

REPUBLISH_BACKOFF = 8
"""Each time a message is published again, the next time waits this many times longer."""
REPUBLISH_CAP = 64
"""... but never more than this many times ``republish_after``."""
DEFER_BASE, DEFER_CAP = 0.5, 30.0
"""Seconds before a message deferred for the first time goes out again, and the most."""


class OutboxStore:
    """Writing messages, and the relay's side of them."""

    def __init__(self, tables: Tables) -> None:
        self._enqueue = tables.sql(_ENQUEUE)
        self._drop_unstarted = tables.sql(_DROP_UNSTARTED)
        self._unpublish = tables.sql(_UNPUBLISH)
        self._take_batch = tables.sql(_TAKE_BATCH)
        self._mark_published = tables.sql(_MARK_PUBLISHED)
        self._release = tables.sql(_RELEASE)
        self._next_due = tables.sql(_NEXT_DUE)
        self._republish_due = tables.sql(_REPUBLISH_DUE)
        self._defer = tables.sql(_DEFER)

    def enqueue(
        self,
        conn: Connection,
        run_id: str,
        kind: str,
        messages: Sequence[dict[str, Any]],
        trace_context: Any = None,
    ) -> None:
        """Write messages (``step``, ``attempt``, ``queue``, ``priority``, ``time_limit``,
        ``delay`` in seconds) in the caller's transaction."""
        if messages:
            params: dict[str, Any] = {"run_id": run_id, "kind": kind}
            params["rows"] = dumps(list(messages))
            params["trace"] = None if trace_context is None else dumps(trace_context)
            conn.execute(self._enqueue, params)

    def unpublish(self, conn: Connection, run_id: str, kind: str, steps: Sequence[str]) -> None:
        """Hand messages a worker failed to publish itself back to the relay."""
        conn.execute(self._unpublish, {"run_id": run_id, "kind": kind, "steps": list(steps)})

    def drop_unstarted(self, conn: Connection, run_id: str, kind: str = "step") -> None:
        """Delete the run's messages of ``kind`` no worker has claimed (the run has stopped)."""
        conn.execute(self._drop_unstarted, {"run_id": run_id, "kind": kind})

    def take_batch(
        self, conn: Connection, limit: int, lookahead: float, hold: float
    ) -> list[Row]:
        """Take up to ``limit`` unpublished messages due within ``lookahead`` seconds for
        publishing, skipping those another relay is taking: they are held for ``hold`` seconds
        (due again after that if this relay never says it published them)."""
        params = {"limit": limit, "lookahead": lookahead, "hold": hold}
        return [dict(r) for r in conn.execute(self._take_batch, params).mappings()]

    def mark_published(
        self, conn: Connection, ids: Sequence[int], held: Any, republish_after: float
    ) -> None:
        """Record that these messages, taken with ``held_until`` = ``held``, reached the
        broker; each is due to go out again, if no worker claims it, ``republish_after``
        seconds from now, and eight times longer with each time it was published before.
        A row that changed meanwhile (a worker already sent it back) is left as it is."""
        if ids:
            params = {"ids": list(ids), "held": held, "republish_after": republish_after}
            conn.execute(self._mark_published, params | {"backoff": REPUBLISH_BACKOFF,
                                                         "cap": REPUBLISH_CAP})

    def release(self, conn: Connection, ids: Sequence[int], held: Any) -> None:
        """Hand messages taken (``held``) but not published back at once (the broker
        failed)."""
        if ids:
            conn.execute(self._release, {"ids": list(ids), "held": held})

    def defer(self, conn: Connection, ref: AttemptRef) -> int | None:
        """Send a message a worker could not run (it lacks the run's workflow definition)
        back for another worker, after a delay growing with each deferral; how many times it
        was deferred, or ``None`` when the message is stale (no such outbox row)."""
        params: dict[str, Any] = {"run_id": ref.run_id, "kind": ref.kind, "step": ref.step}
        params |= {"attempt": ref.attempt, "base": DEFER_BASE, "cap": DEFER_CAP}
        found = conn.execute(self._defer, params).scalar()
        return None if found is None else int(found)

    @property
    def next_due_sql(self) -> str:
        """The SQL of :meth:`seconds_to_next_due`, for a plain psycopg connection."""
        return str(self._next_due.text)

    def seconds_to_next_due(self, conn: Connection) -> float | None:
        """Seconds until the earliest unpublished message is due (negative: overdue)."""
        value = conn.execute(self._next_due).scalar()
        return None if value is None else float(value)

    def republish_due(self, conn: Connection, limit: int) -> list[Row]:
        """Hand back to the relay the published messages whose attempt is still ready at their
        ``republish_at`` (the broker may have lost them); delete those whose attempt started."""
        rows = conn.execute(self._republish_due, {"limit": limit}).all()
        return [
            {"run_id": r[0], "kind": r[1], "step": r[2], "attempt": r[3], "published": r[4]}
            for r in rows
        ]
