"""Statements on the ``runs`` table."""

from __future__ import annotations

import contextlib
import re
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from saga.errors import UnknownRunError
from saga.store.base import Row, Tables

MIN_PREFIX = 8
"""The fewest hex digits of a run id accepted as a prefix of it."""
_PREFIX = re.compile(r"[0-9a-fA-F-]+")

_LOCK = "SELECT * FROM {runs} WHERE id = :run_id FOR UPDATE"
_BY_ID = "SELECT * FROM {runs} WHERE id = :ref"
# A key may name several runs of a workflow (finished ones, and the newest): the newest is the
# key's run. Several workflows' runs under one key make it ambiguous.
_BY_KEY = """
SELECT * FROM (
    SELECT DISTINCT ON (workflow) * FROM {runs}
    WHERE business_key = :ref AND (CAST(:workflow AS text) IS NULL OR workflow = :workflow)
    ORDER BY workflow, created_at DESC
) newest ORDER BY created_at DESC LIMIT 2
"""
# A prefix is a range of the primary key: uuids sort by their bytes, as their hex digits do.
_BY_PREFIX = "SELECT * FROM {runs} WHERE id BETWEEN :low AND :high ORDER BY id LIMIT 2"
_SET_STATE = """
UPDATE {runs} SET state = :to, updated_at = now(),
    error = CASE WHEN :clear_error THEN NULL ELSE coalesce(CAST(:error AS jsonb), error) END,
    result = CASE WHEN :clear_result THEN NULL ELSE result END,
    finished_at = CASE WHEN :finished THEN now() ELSE NULL END,
    steps_remaining = coalesce(:steps_remaining, steps_remaining),
    compensations_remaining = coalesce(:compensations_remaining, compensations_remaining)
WHERE id = :run_id AND state = ANY(:from_states)
RETURNING state
"""


_GATHER_RESULT = """
UPDATE {runs} SET result = (
    SELECT jsonb_object_agg(step, result) FROM {steps}
    WHERE run_id = :run_id AND kind = 'step' AND state = 'completed' AND step = ANY(:sinks))
WHERE id = :run_id
"""

# Locked: a child finishing meanwhile is rechecked after its commit, and left out.
_LIVE_CHILDREN = """
SELECT id::text FROM {runs} WHERE parent_run_id = :run_id AND state = 'running' ORDER BY id
FOR UPDATE
"""

_RESTART_DEADLINE = """
UPDATE {runs} SET deadline_at = now() + make_interval(secs => CAST(:seconds AS float8))
WHERE id = :run_id
"""


class RunStore:
    """Reads and guarded state changes of runs."""

    def __init__(self, tables: Tables) -> None:
        self._lock = tables.sql(_LOCK)
        self._by_id = tables.sql(_BY_ID)
        self._by_key = tables.sql(_BY_KEY)
        self._by_prefix = tables.sql(_BY_PREFIX)
        self._set_state = tables.sql(_SET_STATE)
        self._restart_deadline = tables.sql(_RESTART_DEADLINE)
        self._gather_result = tables.sql(_GATHER_RESULT)
        self._live_children = tables.sql(_LIVE_CHILDREN)

    def lock(self, conn: Connection, run_id: str) -> Row | None:
        """The run's row, locked ``FOR UPDATE`` until the caller's transaction ends."""
        row = conn.execute(self._lock, {"run_id": run_id}).mappings().first()
        return dict(row) if row else None

    def find(self, conn: Connection, ref: str, workflow: str | None = None) -> list[Row]:
        """The run whose id is ``ref``, or the newest run of each workflow whose business key
        is ``ref`` (at most two: more than one means the key is ambiguous)."""
        with contextlib.suppress(ValueError):
            rows = conn.execute(self._by_id, {"ref": str(uuid.UUID(ref))}).mappings().all()
            if rows:
                return [dict(r) for r in rows]
        # Not a run id: a business key (which may look like a UUID too).
        params = {"ref": ref, "workflow": workflow}
        return [dict(r) for r in conn.execute(self._by_key, params).mappings()]

    def find_prefix(self, conn: Connection, ref: str) -> list[Row]:
        """Runs whose id starts with ``ref`` (at least :data:`MIN_PREFIX` hex digits, hyphens
        ignored); at most two: more means ambiguous. Not a prefix: no runs."""
        digits = ref.replace("-", "").lower()
        if not _PREFIX.fullmatch(ref) or not MIN_PREFIX <= len(digits) <= 32:
            return []
        low = uuid.UUID(digits.ljust(32, "0"))
        high = uuid.UUID(digits.ljust(32, "f"))
        params = {"low": low, "high": high}
        return [dict(r) for r in conn.execute(self._by_prefix, params).mappings()]

    def find_one(self, conn: Connection, ref: str, workflow: str | None = None) -> Row:
        """The run whose id, business key, or unique id prefix (8 or more hex digits) is
        ``ref``, in that order; :class:`UnknownRunError` saying why when there is none or
        ``ref`` is ambiguous."""
        found = self.find(conn, ref, workflow)
        if len(found) > 1:
            raise UnknownRunError(f"key {ref!r} names runs of several workflows; use the run id")
        if not found:
            found = self.find_prefix(conn, ref)
            if len(found) > 1:
                raise UnknownRunError(
                    f"run id prefix {ref!r} is ambiguous: it names more than one run; "
                    "give more characters"
                )
        if not found:
            raise UnknownRunError(f"no run with id or key {ref!r}")
        return found[0]

    def set_state(
        self,
        conn: Connection,
        run_id: str,
        from_states: Sequence[str],
        to: str,
        *,
        finished: bool = False,
        error: str | None = None,
        clear_error: bool = False,
        clear_result: bool = False,
        steps_remaining: int | None = None,
        compensations_remaining: int | None = None,
    ) -> bool:
        """Move the run to ``to`` if it is in one of ``from_states``; whether it moved.
        ``error`` (JSON) replaces the run's error, ``clear_error`` removes it, ``clear_result``
        removes the result gathered so far."""
        params: dict[str, Any] = {
            "run_id": run_id,
            "from_states": list(from_states),
            "to": to,
            "finished": finished,
            "error": error,
            "clear_error": clear_error,
            "clear_result": clear_result,
            "steps_remaining": steps_remaining,
            "compensations_remaining": compensations_remaining,
        }
        return conn.execute(self._set_state, params).first() is not None

    def restart_deadline(self, conn: Connection, run_id: str, seconds: float | None) -> None:
        """Give the run a new deadline ``seconds`` from now (none when ``None``)."""
        conn.execute(self._restart_deadline, {"run_id": run_id, "seconds": seconds})

    def gather_result(self, conn: Connection, run_id: str, sinks: Sequence[str]) -> None:
        """Set the run's result from its completed sink steps (after an operator's retry)."""
        conn.execute(self._gather_result, {"run_id": run_id, "sinks": list(sinks)})

    def live_children(self, conn: Connection, run_id: str) -> list[str]:
        """The ids of the run's child runs that are still ``running``, locked."""
        return [str(r[0]) for r in conn.execute(self._live_children, {"run_id": run_id})]
