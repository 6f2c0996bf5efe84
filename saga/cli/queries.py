"""The read queries behind ``saga status`` and ``saga list``, each written to use an index
(they must stay fast with millions of runs)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Connection

from saga.cli.config import CliError, ExitCode
from saga.errors import UnknownRunError
from saga.store import counts as run_counts
from saga.store.base import Row, Tables
from saga.store.runs import RunStore

LIST_COLUMNS = (
    "id, workflow, version, state, business_key, created_at, updated_at, finished_at, "
    "error->>'message' AS error_message"
)

# Distinct workflows by a loose index scan of ix_runs_workflow_state: one index probe per
# workflow instead of reading every row.
_WORKFLOWS = run_counts.WORKFLOWS_CTE + "SELECT name FROM w WHERE name IS NOT NULL"
_BACKLOG = """
SELECT count(*) AS unpublished,
       count(*) FILTER (WHERE available_at <= now()) AS due,
       min(available_at) FILTER (WHERE available_at <= now()) AS oldest_due_at,
       now() AS now
FROM {outbox} WHERE published_at IS NULL
"""
_EXPIRED = """
SELECT s.run_id, r.workflow, s.kind, s.step, s.attempt, s.worker, s.lease_expires_at
FROM {steps} s JOIN {runs} r ON r.id = s.run_id
WHERE s.state = 'running' AND s.lease_expires_at < now()
ORDER BY s.lease_expires_at LIMIT :limit
"""
_EXPIRED_COUNT = (
    "SELECT count(*) FROM {steps} WHERE state = 'running' AND lease_expires_at < now()"
)
_OPERATOR = """
SELECT id, workflow, version, business_key, created_at, updated_at,
       error->>'message' AS error_message
FROM {runs} WHERE state = 'compensation_failed'
ORDER BY created_at DESC LIMIT :limit
"""
_OPERATOR_COUNT = "SELECT count(*) FROM {runs} WHERE state = 'compensation_failed'"
_STEPS = """
SELECT kind, step, state, attempt, first_attempt, worker, created_at, started_at, finished_at,
       due_at, lease_expires_at, wake_at, signal, error, result
FROM {steps} WHERE run_id = :id
ORDER BY kind DESC, started_at NULLS LAST, step
"""
_RELATIVES = """
SELECT id::text AS id, workflow, version, state, parent_step, parent_attempt
FROM {runs} WHERE id = :parent OR parent_run_id = :id ORDER BY created_at, id
"""
_HISTORY = """
SELECT id, at, event, kind, step, attempt, detail
FROM {history} WHERE run_id = :id ORDER BY id
"""


def workflows(conn: Connection, tables: Tables) -> list[str]:
    """Names of the workflows that have runs (by a loose index scan)."""
    return [r[0] for r in conn.execute(tables.sql(_WORKFLOWS))]


def counts(conn: Connection, tables: Tables, states: tuple[str, ...]) -> dict[str, dict[str, int]]:
    """Runs by workflow and state (only ``states``), from :mod:`saga.store.counts`: the
    finished states from their counters, the others on ``ix_runs_workflow_state``."""
    wanted = set(states)
    return {
        wf: {s: n for s, n in by_state.items() if s in wanted}
        for wf, by_state in run_counts.runs_by_state(conn, tables).items()
    }


def backlog(conn: Connection, tables: Tables) -> Row:
    """Unpublished outbox rows, how many are due, and the age in seconds of the oldest due."""
    row = dict(conn.execute(tables.sql(_BACKLOG)).mappings().one())
    oldest = row.pop("oldest_due_at")
    now = row.pop("now")
    row["oldest_age_seconds"] = None if oldest is None else (now - oldest).total_seconds()
    return row


def expired_leases(conn: Connection, tables: Tables, limit: int) -> tuple[int, list[Row]]:
    """How many running steps are past their lease, and the ``limit`` oldest of them."""
    total = int(conn.execute(tables.sql(_EXPIRED_COUNT)).scalar_one())
    rows = [dict(r) for r in conn.execute(tables.sql(_EXPIRED), {"limit": limit}).mappings()]
    return total, rows


def waiting_for_operator(conn: Connection, tables: Tables, limit: int) -> tuple[int, list[Row]]:
    """How many runs are ``compensation_failed``, and the ``limit`` newest of them."""
    total = int(conn.execute(tables.sql(_OPERATOR_COUNT)).scalar_one())
    rows = [dict(r) for r in conn.execute(tables.sql(_OPERATOR), {"limit": limit}).mappings()]
    return total, rows


def find_run(conn: Connection, tables: Tables, ref: str) -> Row:
    """The run whose id, business key or unique id prefix (8+ hex digits) is ``ref``;
    ``NOT_FOUND`` if none, if the key names runs of several workflows, or if the prefix is
    ambiguous."""
    try:
        return RunStore(tables).find_one(conn, ref)
    except UnknownRunError as exc:
        raise CliError(str(exc), ExitCode.NOT_FOUND) from None


def run_steps(conn: Connection, tables: Tables, run_id: Any) -> list[Row]:
    """The run's step and compensation rows."""
    return [dict(r) for r in conn.execute(tables.sql(_STEPS), {"id": run_id}).mappings()]


def run_relatives(conn: Connection, tables: Tables, run: Row) -> tuple[Row | None, list[Row]]:
    """The run's parent run (``None`` if it is no child) and its child runs, oldest first:
    id, workflow, version, state, and the step and attempt of the parent that started it."""
    params = {"id": run["id"], "parent": run.get("parent_run_id")}
    rows = [dict(r) for r in conn.execute(tables.sql(_RELATIVES), params).mappings()]
    parent = next((r for r in rows if r["id"] == str(run.get("parent_run_id"))), None)
    return parent, [r for r in rows if r is not parent]


def run_history(conn: Connection, tables: Tables, run_id: Any) -> list[Row]:
    """The run's history, oldest first."""
    return [dict(r) for r in conn.execute(tables.sql(_HISTORY), {"id": run_id}).mappings()]


@dataclass(frozen=True)
class ListFilter:
    """The filters and cursor of ``saga list``."""

    states: tuple[str, ...] = ()
    workflow: str | None = None
    key: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    before: datetime | None = None
    before_id: uuid.UUID | None = None
    limit: int = 50
    offset: int = 0


def _where(f: ListFilter, params: dict[str, Any]) -> list[str]:
    where: list[str] = []
    if f.workflow is not None:
        where.append("workflow = :workflow")
        params["workflow"] = f.workflow
    if f.key is not None:
        where.append("business_key = :key")
        params["key"] = f.key
    if f.since is not None:
        where.append("created_at >= :since")
        params["since"] = f.since
    if f.until is not None:
        where.append("created_at < :until")
        params["until"] = f.until
    if f.before is not None and f.before_id is not None:
        where.append("created_at <= :before AND (created_at, id) < (:before, :before_id)")
        params["before"] = f.before
        params["before_id"] = f.before_id
    elif f.before is not None:
        where.append("created_at < :before")
        params["before"] = f.before
    return where


def list_runs(conn: Connection, tables: Tables, f: ListFilter) -> list[Row]:
    """Runs matching ``f``, newest first: keyset pagination on ``(created_at, id)``.

    One state reads ``ix_runs_state_created_at`` backwards; several states read it once per
    state (``UNION ALL`` of limited scans) and merge, which is as cheap as one state.
    """
    params: dict[str, Any] = {"limit": f.limit, "offset": f.offset}
    where = _where(f, params)
    order = "ORDER BY created_at DESC, id DESC"
    if len(f.states) > 1 and f.key is None:
        parts = []
        for i, state in enumerate(f.states):
            params[f"s{i}"] = state
            clause = " AND ".join([f"state = :s{i}", *where])
            parts.append(
                f"(SELECT {LIST_COLUMNS} FROM {{runs}} WHERE {clause} {order} "
                "LIMIT :limit + :offset)"
            )
        sql = f"SELECT * FROM ({' UNION ALL '.join(parts)}) u {order} LIMIT :limit OFFSET :offset"
    else:
        if f.states:
            where.append("state = ANY(CAST(:states AS text[]))")
            params["states"] = list(f.states)
        if f.key is not None and f.workflow is None:
            # Use ix_runs_workflow_business_key_created_at, one probe per workflow.
            where.append("workflow = ANY(CAST(:workflows AS text[]))")
            params["workflows"] = workflows(conn, tables)
        clause = ("WHERE " + " AND ".join(where)) if where else ""
        sql = f"SELECT {LIST_COLUMNS} FROM {{runs}} {clause} {order} LIMIT :limit OFFSET :offset"
    return [dict(r) for r in conn.execute(tables.sql(sql), params).mappings()]


# An attempt waits for a worker from the moment its outbox row is due until a worker claims
# it (the claim deletes the row): a published row (its due time is then only the relay's hold
# on it), a due unpublished one, or one a worker without the run's definition deferred.
WAITING = "(published_at IS NOT NULL OR available_at <= now() OR deferrals > 0)"
_WAITING_BY_QUEUE = f"""
SELECT queue, count(*) AS messages,
       EXTRACT(EPOCH FROM (now() - min(created_at)))::float8 AS oldest_seconds
FROM {{outbox}} WHERE {WAITING}
GROUP BY queue ORDER BY queue
"""
# The runs of the oldest :cap waiting attempts (stuck ones are the oldest), one primary-key
# probe each (OFFSET 0 keeps the planner from turning the probes into a scan of every run).
_WAITING_BY_DEFINITION = f"""
SELECT r.workflow, r.version, r.definition_hash, count(*) AS runs
FROM (SELECT DISTINCT run_id FROM (
          SELECT run_id FROM {{outbox}} WHERE {WAITING}
          ORDER BY created_at LIMIT :cap) oldest) o
CROSS JOIN LATERAL (
    SELECT workflow, version, definition_hash FROM {{runs}} WHERE id = o.run_id OFFSET 0) r
GROUP BY r.workflow, r.version, r.definition_hash ORDER BY r.workflow, r.version
"""
WAITING_SAMPLE = 1000
"""How many of the oldest waiting attempts :func:`waiting_by_definition` looks at."""


def waiting_by_queue(conn: Connection, tables: Tables) -> list[Row]:
    """Queues with step attempts due and not yet claimed (published or not): every such
    attempt has its outbox row until a worker claims it."""
    return [dict(r) for r in conn.execute(tables.sql(_WAITING_BY_QUEUE)).mappings()]


def waiting_by_definition(conn: Connection, tables: Tables) -> list[Row]:
    """The workflow definitions (name, version, hash) of runs with attempts waiting for a
    worker, and how many runs each, among those of the :data:`WAITING_SAMPLE` oldest
    waiting attempts."""
    rows = conn.execute(tables.sql(_WAITING_BY_DEFINITION), {"cap": WAITING_SAMPLE})
    return [dict(r) for r in rows.mappings()]
