"""Statements on the ``step_runs`` table (steps and compensations)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.store.base import Row, Tables

_OF_RUN = "SELECT * FROM {steps} WHERE run_id = :run_id ORDER BY kind DESC, created_at, step"
_FINISH_ATTEMPT = """
UPDATE {steps}
SET state = :to, error = CAST(:error AS jsonb), finished_at = now(), lease_expires_at = NULL
WHERE run_id = :run_id AND kind = :kind AND step = :step AND state = 'running'
  AND attempt = :attempt
RETURNING first_attempt
"""
_RETRY_ATTEMPT = """
UPDATE {steps}
SET state = 'ready', attempt = attempt + 1, error = CAST(:error AS jsonb),
    due_at = now() + make_interval(secs => :delay), lease_expires_at = NULL
WHERE run_id = :run_id AND kind = :kind AND step = :step AND state = 'running'
  AND attempt = :attempt
RETURNING attempt, due_at
"""
_SKIP_UNSTARTED = """
UPDATE {steps} SET state = 'skipped', finished_at = now(), wake_at = NULL
WHERE run_id = :run_id AND kind = 'step' AND state IN ('waiting', 'ready', 'suspended')
RETURNING step
"""
_INSERT = """
INSERT INTO {steps} (run_id, kind, step, state, attempt, first_attempt, pending_deps)
SELECT :run_id, :kind, x.step, CASE WHEN x.pending = 0 THEN 'ready' ELSE 'waiting' END,
       CASE WHEN x.pending = 0 THEN 1 ELSE 0 END, 1, x.pending
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(step text, pending int)
"""
_RESET = """
UPDATE {steps} sr
SET state = CASE WHEN x.pending = 0 THEN 'ready' ELSE 'waiting' END,
    attempt = CASE WHEN x.pending = 0 THEN sr.attempt + 1 ELSE sr.attempt END,
    first_attempt = sr.attempt + 1, pending_deps = x.pending, finished_at = NULL,
    lease_expires_at = NULL, due_at = NULL
FROM jsonb_to_recordset(CAST(:rows AS jsonb)) AS x(step text, pending int)
WHERE sr.run_id = :run_id AND sr.kind = :kind AND sr.step = x.step
  AND sr.state IN ('failed', 'skipped', 'waiting', 'ready', 'completed')
RETURNING sr.step, sr.state, sr.attempt
"""


class StepStore:
    """Reads and guarded state changes of step rows."""

    def __init__(self, tables: Tables) -> None:
        self._of_run = tables.sql(_OF_RUN)
        self._finish_attempt = tables.sql(_FINISH_ATTEMPT)
        self._retry_attempt = tables.sql(_RETRY_ATTEMPT)
        self._skip_unstarted = tables.sql(_SKIP_UNSTARTED)
        self._insert = tables.sql(_INSERT)
        self._reset = tables.sql(_RESET)

    def of_run(self, conn: Connection, run_id: str) -> list[Row]:
        """Every step and compensation row of a run."""
        return [dict(r) for r in conn.execute(self._of_run, {"run_id": run_id}).mappings()]

    def fail_attempt(
        self, conn: Connection, run_id: str, kind: str, step: str, attempt: int, error: Any
    ) -> bool:
        """Mark a running attempt ``failed`` for good; ``False`` if it was stale."""
        params = {"run_id": run_id, "kind": kind, "step": step, "attempt": attempt}
        params |= {"to": "failed", "error": dumps(error)}
        return conn.execute(self._finish_attempt, params).first() is not None

    def retry_attempt(
        self,
        conn: Connection,
        run_id: str,
        kind: str,
        step: str,
        attempt: int,
        error: Any,
        delay: float,
    ) -> int | None:
        """Make the next attempt ready after ``delay`` seconds; its number, or ``None`` if stale."""
        params = {"run_id": run_id, "kind": kind, "step": step, "attempt": attempt}
        params |= {"error": dumps(error), "delay": delay}
        row = conn.execute(self._retry_attempt, params).first()
        return None if row is None else int(row[0])

    def skip_unstarted(self, conn: Connection, run_id: str) -> list[str]:
        """Mark steps that never started ``skipped``; their names."""
        return [r[0] for r in conn.execute(self._skip_unstarted, {"run_id": run_id})]

    def insert(self, conn: Connection, run_id: str, kind: str, pending: dict[str, int]) -> None:
        """Create rows: ``ready`` (attempt 1) where nothing is pending, else ``waiting``."""
        rows = [{"step": s, "pending": n} for s, n in pending.items()]
        conn.execute(self._insert, {"run_id": run_id, "kind": kind, "rows": dumps(rows)})

    def reset(
        self, conn: Connection, run_id: str, kind: str, pending: dict[str, int]
    ) -> list[tuple[str, str, int]]:
        """Give these rows (not running) a fresh retry budget: ``ready`` or ``waiting`` again."""
        rows = [{"step": s, "pending": n} for s, n in pending.items()]
        params = {"run_id": run_id, "kind": kind, "rows": dumps(rows)}
        return [(r[0], r[1], r[2]) for r in conn.execute(self._reset, params)]

    @staticmethod
    def names(rows: Sequence[Row], kind: str, *states: str) -> set[str]:
        """Names of the rows of ``kind`` in any of ``states``."""
        return {r["step"] for r in rows if r["kind"] == kind and r["state"] in states}
