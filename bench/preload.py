"""Fill a benchmark database with finished runs, and show the plans of the hot statements.

``preload(dsn, n, workflow)`` writes ``n`` completed runs of ``workflow`` (a linear workflow of
three steps), as the engine leaves them: the run row with its result, three completed step
rows, and eight history rows (``run_started``, ``step_started`` and ``step_completed`` per step,
``run_completed``), spread over the last 30 days, then ``VACUUM ANALYZE``. ``explain(dsn)``
prints ``EXPLAIN`` of every statement on a step's path and of the relay's and sweeper's
recurring queries, with the parameters of a real ready step, so a reader can check that each
uses an index.
"""

from __future__ import annotations

import time
from typing import Any

import psycopg

_RUNS = """
INSERT INTO saga.runs (id, workflow, version, definition_hash, state, input, result,
                       steps_remaining, created_at, updated_at, finished_at)
SELECT md5('preload' || i)::uuid, %(workflow)s, 1, %(hash)s, 'completed', '{}'::jsonb,
       '{"third": null}'::jsonb, 0, t, t + interval '20 ms', t + interval '20 ms'
FROM (SELECT i, now() - interval '30 days' + i * (interval '29 days' / %(n)s) AS t
      FROM generate_series(1, %(n)s) AS i) g
"""
_STEPS = """
INSERT INTO saga.step_runs (run_id, kind, step, state, attempt, first_attempt, pending_deps,
                            result, created_at, started_at, finished_at, worker)
SELECT r.id, 'step', s.step, 'completed', 1, 1, 0, 'null'::jsonb, r.created_at,
       r.created_at + s.off, r.created_at + s.off + interval '5 ms', 'preload'
FROM saga.runs r
CROSS JOIN (VALUES ('first', interval '1 ms'), ('second', interval '7 ms'),
                   ('third', interval '13 ms')) AS s(step, off)
WHERE r.definition_hash = %(hash)s AND r.state = 'completed'
  AND r.created_at <= now() - interval '23 hours'  -- the preloaded runs, not the benchmark's
"""
_HISTORY = """
INSERT INTO saga.history (run_id, event, kind, step, attempt, at)
SELECT s.run_id, e.event, 'step', s.step, 1,
       CASE e.event WHEN 'step_started' THEN s.started_at ELSE s.finished_at END
FROM saga.step_runs s CROSS JOIN (VALUES ('step_started'), ('step_completed')) AS e(event)
WHERE s.worker = 'preload'
UNION ALL
SELECT r.id, e.event, NULL, NULL, NULL, r.created_at
FROM saga.runs r CROSS JOIN (VALUES ('run_started'), ('run_completed')) AS e(event)
WHERE r.definition_hash = %(hash)s AND r.state = 'completed'
  AND r.created_at <= now() - interval '23 hours'  -- the preloaded runs, not the benchmark's
"""


def preload(dsn: str, n: int, workflow: Any) -> dict[str, float]:
    """Write ``n`` finished runs of ``workflow``; seconds each table took."""
    params = {"n": n, "workflow": workflow.name, "hash": workflow.definition_hash}
    took: dict[str, float] = {}
    with psycopg.connect(dsn, autocommit=True) as conn:
        for name, statement in (("runs", _RUNS), ("step_runs", _STEPS), ("history", _HISTORY)):
            t0 = time.perf_counter()
            conn.execute(statement.encode(), params)
            took[name] = round(time.perf_counter() - t0, 1)
        t0 = time.perf_counter()
        conn.execute(b"VACUUM (ANALYZE) saga.runs, saga.step_runs, saga.history, saga.outbox")
        took["vacuum_analyze"] = round(time.perf_counter() - t0, 1)
    return took


def _ready_step(conn: psycopg.Connection[Any]) -> dict[str, Any]:
    """A step's run, name and attempt, for the plans' parameters: a ready one if there is one
    (a worker may have claimed a fresh run's steps already; the plans are the same)."""
    row = conn.execute(
        "SELECT run_id::text, step, attempt FROM saga.step_runs "
        "ORDER BY (state = 'ready') DESC LIMIT 1"
    ).fetchone()
    if row is None:
        raise RuntimeError("explain needs a step row: start a run first")
    return {"run_id": row[0], "step": row[1], "attempt": row[2]}


def explain(dsn: str) -> str:
    """``EXPLAIN`` of the hot and recurring statements (the SQL saga runs, with the
    parameters of one ready step), as text."""
    from sqlalchemy import create_engine, text

    from saga.store.base import Tables
    from saga.store.outbox import _REPUBLISH_DUE, _TAKE_BATCH
    from saga.sweeper import _EXPIRED, _PAST_DEADLINE, _STALLED
    from saga.transitions import _CLAIM, _COMPLETE

    tables = Tables("saga")
    out: list[str] = []
    with psycopg.connect(dsn) as raw:
        ref = _ready_step(raw)
    engine = create_engine("postgresql+psycopg://", creator=lambda: psycopg.connect(dsn))
    with engine.connect() as conn:
        common = {**ref, "kind": "step", "token": "explain", "lease": 15.0}
        sweep = {"limit": 100, "known": ["bench.linear:1", "bench.fan:1"]}
        cases: list[tuple[str, str, dict[str, Any]]] = [
            ("claim", _CLAIM, common | {
                "live": ["running"], "workflow": "bench.linear", "version": 1, "hash": "x",
                "deps": [],
            }),
            ("complete", _COMPLETE, common | {
                "result": "null", "release": ["second"], "routes": "[]", "live": ["running"],
                "sink": False, "eager": True, "republish_after": 300.0, "follow": "second",
                "follow_token": "explain",
            }),
            ("relay: take a batch", _TAKE_BATCH, {"limit": 200, "lookahead": 2.0, "hold": 30.0}),
            ("sweeper: republish due", _REPUBLISH_DUE, {"limit": 100}),
            ("sweeper: expired leases", _EXPIRED, sweep),
            ("sweeper: past deadline", _PAST_DEADLINE, sweep),
            ("sweeper: stalled stops", _STALLED, sweep),
        ]
        for name, template, params in cases:
            # EXPLAIN only plans: nothing of these statements runs.
            sql = "EXPLAIN " + str(tables.sql(template).text)
            plan = conn.execute(text(sql), params).fetchall()
            out.append(f"-- {name}\n" + "\n".join(r[0] for r in plan))
        conn.rollback()
    engine.dispose()
    return "\n\n".join(out)
