"""Statements on the ``outbox`` table."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
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
_CLAIM_BATCH = """
SELECT o.id, o.run_id::text AS run_id, r.workflow, r.version, o.kind, o.step, o.attempt,
       o.queue, o.priority, o.time_limit, o.publish_count, o.trace_context,
       EXTRACT(EPOCH FROM (o.available_at - now()))::float8 AS countdown,
       EXTRACT(EPOCH FROM (now() - o.created_at))::float8 AS age
FROM {outbox} o JOIN {runs} r ON r.id = o.run_id
WHERE o.published_at IS NULL AND o.available_at <= now() + make_interval(secs => :lookahead)
ORDER BY o.available_at, o.id
LIMIT :limit
FOR UPDATE OF o SKIP LOCKED
"""
_MARK_PUBLISHED = """
UPDATE {outbox} SET published_at = now(), publish_count = publish_count + 1
WHERE id = ANY(:ids)
"""
_NEXT_DUE = """
SELECT EXTRACT(EPOCH FROM (min(available_at) - now())) FROM {outbox} WHERE published_at IS NULL
"""
_REPUBLISH_STALE = """
UPDATE {outbox} o SET published_at = NULL
WHERE o.id IN (
    SELECT id FROM {outbox}
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => :older)
    ORDER BY published_at LIMIT :limit FOR UPDATE SKIP LOCKED)
  AND EXISTS (SELECT 1 FROM {steps} s WHERE s.run_id = o.run_id AND s.kind = o.kind
              AND s.step = o.step AND s.attempt = o.attempt AND s.state = 'ready')
RETURNING o.run_id::text, o.kind, o.step, o.attempt
"""
_DELETE_CLAIMED = """
DELETE FROM {outbox} o
WHERE o.id IN (
    SELECT id FROM {outbox}
    WHERE published_at IS NOT NULL AND published_at < now() - make_interval(secs => :older)
    ORDER BY published_at LIMIT :limit FOR UPDATE SKIP LOCKED)
  AND NOT EXISTS (SELECT 1 FROM {steps} s WHERE s.run_id = o.run_id AND s.kind = o.kind
                  AND s.step = o.step AND s.attempt = o.attempt AND s.state = 'ready')
"""


class OutboxStore:
    """Writing messages, and the relay's side of them."""

    def __init__(self, tables: Tables) -> None:
        self._enqueue = tables.sql(_ENQUEUE)
        self._drop_unstarted = tables.sql(_DROP_UNSTARTED)
        self._unpublish = tables.sql(_UNPUBLISH)
        self._claim_batch = tables.sql(_CLAIM_BATCH)
        self._mark_published = tables.sql(_MARK_PUBLISHED)
        self._next_due = tables.sql(_NEXT_DUE)
        self._republish_stale = tables.sql(_REPUBLISH_STALE)
        self._delete_claimed = tables.sql(_DELETE_CLAIMED)

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

    def claim_batch(self, conn: Connection, limit: int, lookahead: float) -> list[Row]:
        """Lock up to ``limit`` unpublished messages due within ``lookahead`` seconds,
        skipping those another relay holds."""
        params = {"limit": limit, "lookahead": lookahead}
        return [dict(r) for r in conn.execute(self._claim_batch, params).mappings()]

    def mark_published(self, conn: Connection, ids: Sequence[int]) -> None:
        """Record that these messages reached the broker."""
        if ids:
            conn.execute(self._mark_published, {"ids": list(ids)})

    @property
    def next_due_sql(self) -> str:
        """The SQL of :meth:`seconds_to_next_due`, for a plain psycopg connection."""
        return str(self._next_due.text)

    def seconds_to_next_due(self, conn: Connection) -> float | None:
        """Seconds until the earliest unpublished message is due (negative: overdue)."""
        value = conn.execute(self._next_due).scalar()
        return None if value is None else float(value)

    def republish_stale(self, conn: Connection, older_than: float, limit: int) -> list[Row]:
        """Mark messages published over ``older_than`` seconds ago whose attempt is still
        ready for publishing again (the broker may have lost them); delete those whose attempt
        started (a claim that found the row locked by a relay leaves it behind)."""
        params = {"older": older_than, "limit": limit}
        conn.execute(self._delete_claimed, params)
        rows = conn.execute(self._republish_stale, params).all()
        return [{"run_id": r[0], "kind": r[1], "step": r[2], "attempt": r[3]} for r in rows]
