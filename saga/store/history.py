"""Statements on the append-only ``history`` table."""

from __future__ import annotations

from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.store.base import Row, Tables

_APPEND = """
INSERT INTO {history} (run_id, event, kind, step, attempt, detail)
VALUES (:run_id, :event, :kind, :step, :attempt, CAST(:detail AS jsonb))
"""
_APPEND_STEPS = """
INSERT INTO {history} (run_id, event, kind, step)
SELECT :run_id, :event, :kind, step FROM unnest(CAST(:steps AS text[])) AS s(step)
"""
_OF_RUN = "SELECT * FROM {history} WHERE run_id = :run_id ORDER BY id"


class HistoryStore:
    """Appending transitions and reading a run's timeline."""

    def __init__(self, tables: Tables) -> None:
        self._append = tables.sql(_APPEND)
        self._of_run = tables.sql(_OF_RUN)
        self._append_steps = tables.sql(_APPEND_STEPS)

    def append(
        self,
        conn: Connection,
        run_id: str,
        event: str,
        *,
        kind: str | None = None,
        step: str | None = None,
        attempt: int | None = None,
        detail: Any = None,
    ) -> None:
        """Record one transition in the caller's transaction."""
        params: dict[str, Any] = {"run_id": run_id, "event": event, "kind": kind, "step": step}
        params |= {"attempt": attempt, "detail": None if detail is None else dumps(detail)}
        conn.execute(self._append, params)

    def append_steps(
        self, conn: Connection, run_id: str, event: str, kind: str, steps: list[str]
    ) -> None:
        """Record the same transition of many ``steps`` in one statement (a map's instances
        skipped at once may be 100,000)."""
        if steps:
            params = {"run_id": run_id, "event": event, "kind": kind, "steps": steps}
            conn.execute(self._append_steps, params)

    def of_run(self, conn: Connection, run_id: str) -> list[Row]:
        """The run's timeline, oldest first."""
        return [dict(r) for r in conn.execute(self._of_run, {"run_id": run_id}).mappings()]
