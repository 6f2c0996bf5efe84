"""Statements on the ``processes`` table: the registry of live workers and relays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import Connection

from saga.codec import dumps
from saga.store.base import Row, Tables

_REGISTER = """
INSERT INTO {processes} (id, kind, name, host, pid, version, queues, definitions)
VALUES (:id, :kind, :name, :host, :pid, :version, CAST(:queues AS jsonb),
        CAST(:definitions AS jsonb))
ON CONFLICT (id) DO UPDATE SET queues = excluded.queues, definitions = excluded.definitions,
    last_seen_at = now()
"""
# A beat that finds no row (pruned while the process was stopped in a debugger, say)
# registers again: the caller passes the whole row.
_BEAT = "UPDATE {processes} SET last_seen_at = now() WHERE id = :id"
_REMOVE = "DELETE FROM {processes} WHERE id = :id"
_PRUNE = """
DELETE FROM {processes} WHERE last_seen_at < now() - make_interval(secs => :older)
"""
_ALL = """
SELECT id, kind, name, host, pid, version, queues, definitions, started_at, last_seen_at,
       EXTRACT(EPOCH FROM (now() - last_seen_at))::float8 AS seen_seconds_ago
FROM {processes} ORDER BY kind, name, started_at
"""


class ProcessStore:
    """Registering, beating, removing and listing processes."""

    def __init__(self, tables: Tables) -> None:
        self._register = tables.sql(_REGISTER)
        self._beat = tables.sql(_BEAT)
        self._remove = tables.sql(_REMOVE)
        self._prune = tables.sql(_PRUNE)
        self._all = tables.sql(_ALL)

    def register(
        self,
        conn: Connection,
        row: dict[str, Any],
        queues: Sequence[str],
        definitions: Sequence[dict[str, Any]],
    ) -> None:
        """Insert (or refresh) the process ``row`` (id, kind, name, host, pid, version)."""
        params = {**row, "queues": dumps(list(queues)), "definitions": dumps(list(definitions))}
        conn.execute(self._register, params)

    def beat(self, conn: Connection, process_id: str) -> bool:
        """Mark the process seen now; ``False`` if its row is gone."""
        return bool(conn.execute(self._beat, {"id": process_id}).rowcount)

    def remove(self, conn: Connection, process_id: str) -> None:
        """Delete the process's row (on a clean exit)."""
        conn.execute(self._remove, {"id": process_id})

    def prune(self, conn: Connection, older_than: float) -> int:
        """Delete rows not seen for ``older_than`` seconds; how many."""
        return int(conn.execute(self._prune, {"older": older_than}).rowcount)

    def all(self, conn: Connection) -> list[Row]:
        """Every registered process, with ``seen_seconds_ago``."""
        return [dict(r) for r in conn.execute(self._all).mappings()]
