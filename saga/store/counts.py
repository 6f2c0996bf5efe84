"""Runs by workflow and state, from a cheap source: the finished states from ``run_counts``
(plus the deltas the triggers wrote since the last fold), the active ones counted on
``ix_runs_workflow_state`` (they are few). Exact, and a handful of index probes whatever the
number of finished runs."""

from __future__ import annotations

from sqlalchemy import Connection

from saga.db.states import RUN_FINISHED, RUN_STATES
from saga.store.base import Tables

UNFINISHED = tuple(s for s in RUN_STATES if s not in RUN_FINISHED)
"""The states counted directly (running, compensating, cancelling, compensation_failed)."""

_FINISHED = """
SELECT workflow, state, sum(n)::bigint AS n FROM (
    SELECT workflow, state, n FROM {run_counts}
    UNION ALL
    SELECT workflow, state, delta FROM {run_count_deltas}
) c GROUP BY workflow, state
"""
# One index-only probe of ix_runs_workflow_state per workflow for the unfinished states, the
# workflows found by a loose index scan (one probe per workflow, not a read of every row).
WORKFLOWS_CTE = """
WITH RECURSIVE w(name) AS (
    (SELECT workflow FROM {runs} ORDER BY workflow LIMIT 1)
    UNION ALL
    SELECT (SELECT workflow FROM {runs} WHERE workflow > w.name ORDER BY workflow LIMIT 1)
    FROM w WHERE w.name IS NOT NULL
)
"""
"""The names of the workflows that have runs, as ``w(name)``, by a loose index scan of
``ix_runs_workflow_state`` (one probe per workflow); the last row's name is NULL."""
_UNFINISHED = WORKFLOWS_CTE + """
SELECT w.name AS workflow, s.state,
       (SELECT count(*) FROM {runs} r WHERE r.workflow = w.name AND r.state = s.state) AS n
FROM w CROSS JOIN unnest(CAST(:states AS text[])) AS s(state)
WHERE w.name IS NOT NULL
"""
# Folding: the deltas go into the counts in one statement. Two relays folding at once: the
# second one's DELETE waits for the first's rows and then finds them gone.
_FOLD = """
WITH gone AS (
    DELETE FROM {run_count_deltas} WHERE id IN (
        SELECT id FROM {run_count_deltas} ORDER BY id LIMIT :limit FOR UPDATE SKIP LOCKED)
    RETURNING workflow, state, delta
), summed AS (
    SELECT workflow, state, sum(delta)::bigint AS n, count(*) AS rows
    FROM gone GROUP BY workflow, state
), applied AS (
    INSERT INTO {run_counts} AS c (workflow, state, n)
    SELECT workflow, state, n FROM summed
    ON CONFLICT (workflow, state) DO UPDATE SET n = c.n + excluded.n
)
SELECT coalesce(sum(rows), 0)::bigint FROM summed
"""
_RECOUNT = """
DELETE FROM {run_count_deltas};
DELETE FROM {run_counts};
INSERT INTO {run_counts} (workflow, state, n)
    SELECT workflow, state, count(*) FROM {runs}
    WHERE state = ANY(CAST(:finished AS text[])) GROUP BY workflow, state;
"""


def runs_by_state(conn: Connection, tables: Tables) -> dict[str, dict[str, int]]:
    """``{workflow: {state: n}}`` for every state with runs (zero counts left out)."""
    out: dict[str, dict[str, int]] = {}
    for workflow, state, n in conn.execute(tables.sql(_FINISHED)):
        if n:
            out.setdefault(workflow, {})[state] = int(n)
    params = {"states": list(UNFINISHED)}
    for workflow, state, n in conn.execute(tables.sql(_UNFINISHED), params):
        if n:
            out.setdefault(workflow, {})[state] = int(n)
    return {
        wf: {s: states[s] for s in RUN_STATES if s in states} for wf, states in sorted(out.items())
    }


def fold_in_tx(conn: Connection, tables: Tables, limit: int = 10_000) -> int:
    """Fold up to ``limit`` delta rows into ``run_counts``; how many were folded."""
    return int(conn.execute(tables.sql(_FOLD), {"limit": limit}).scalar_one())


def recount_in_tx(conn: Connection, tables: Tables) -> None:
    """Rebuild ``run_counts`` from the runs (a repair; it reads every finished run)."""
    conn.execute(tables.sql(f"LOCK TABLE {tables.runs} IN SHARE MODE"))
    for stmt in _RECOUNT.strip().split(";\n"):
        if stmt.strip():
            conn.execute(tables.sql(stmt), {"finished": list(RUN_FINISHED)})
