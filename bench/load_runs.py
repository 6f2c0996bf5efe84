"""Load N runs (default 1,000,000) into a scratch database and time the CLI's reads.

    .venv/bin/python bench/load_runs.py                      # creates database saga_bench
    .venv/bin/python bench/load_runs.py --runs 200000 --keep
    .venv/bin/python bench/load_runs.py --database-url postgresql://.../db --no-load

Rows are made in SQL (``INSERT ... SELECT generate_series``): runs in a spread of states over
five workflows and 60 days, three steps (plus compensations for compensated/failed runs) and a
short history for one run in ten, an outbox backlog, and a few steps past their lease. Then
``saga status``, ``saga list --state failed`` and ``saga status RUN`` are timed as
subprocesses (best and median of several), next to the bare query time measured in process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import psycopg
from psycopg import sql
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url

from saga.store import counts
from saga.store.base import Tables

SERVER = os.environ.get("SAGA_TEST_DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")

# One bucket in 1000 per state: completed 70%, running 8%, failed 8%, compensated 6%, ...
STATE_OF_BUCKET = """
CASE
    WHEN b < 700 THEN 'completed'
    WHEN b < 780 THEN 'running'
    WHEN b < 860 THEN 'failed'
    WHEN b < 920 THEN 'compensated'
    WHEN b < 950 THEN 'cancelled'
    WHEN b < 980 THEN 'resolved'
    WHEN b < 990 THEN 'compensating'
    WHEN b < 995 THEN 'cancelling'
    ELSE 'compensation_failed'
END
"""

LOAD_RUNS = f"""
INSERT INTO {{s}}.runs (id, workflow, version, definition_hash, state, business_key, input,
                       error, steps_remaining, compensations_remaining,
                       created_at, updated_at, finished_at)
SELECT md5('run' || i)::uuid,
       (ARRAY['order','refund','signup','invoice','shipment'])[1 + (i * 7) %% 5],
       1, 'bench', st,
       CASE WHEN i %% 2 = 0 THEN 'key-' || i END,
       jsonb_build_object('n', i),
       CASE WHEN st IN ('failed','compensated','compensation_failed')
            THEN jsonb_build_object('type', 'bench.Boom', 'message', 'boom ' || i) END,
       CASE WHEN st = 'running' THEN 2 ELSE 0 END, 0,
       t, t + interval '3 seconds',
       CASE WHEN st IN ('running','compensating','cancelling','compensation_failed') THEN NULL
            ELSE t + interval '3 seconds' END
FROM (
    SELECT i, ({STATE_OF_BUCKET}) AS st,
           now() - (%(n)s - i) * (interval '60 days' / %(n)s) AS t
    FROM (SELECT i, (i::bigint * 7919) %% 1000 AS b FROM generate_series(1, %(n)s) AS i) g
) x
"""

LOAD_STEPS = """
INSERT INTO {s}.step_runs (run_id, kind, step, state, attempt, pending_deps, error,
                          created_at, started_at, finished_at, lease_expires_at, worker)
SELECT r.id, k.kind, k.step,
       CASE WHEN r.state = 'running' AND k.step = 'charge' THEN 'running'
            WHEN r.state = 'running' AND k.step = 'ship' THEN 'waiting'
            WHEN r.state IN ('failed','compensated') AND k.step = 'ship' THEN 'failed'
            WHEN r.state = 'compensation_failed' AND k.kind = 'compensation' THEN 'failed'
            ELSE 'completed' END,
       1, 0,
       CASE WHEN r.state IN ('failed','compensated', 'compensation_failed') AND k.step = 'ship'
            THEN '{{"message": "carrier down"}}'::jsonb END,
       r.created_at, r.created_at, r.created_at + interval '1 second',
       CASE WHEN r.state = 'running' AND k.step = 'charge'
            THEN r.created_at + interval '5 minutes' END,
       'bench-worker'
FROM {s}.runs r
CROSS JOIN (VALUES ('step','reserve'), ('step','charge'), ('step','ship'),
                   ('compensation','reserve'), ('compensation','charge')) AS k(kind, step)
WHERE ('x' || substr(r.id::text, 1, 2))::bit(8)::int % 10 = 0
  AND (k.kind = 'step' OR r.state IN ('compensated', 'compensation_failed'))
"""

LOAD_HISTORY = """
INSERT INTO {s}.history (run_id, event, kind, step, attempt, detail, at)
SELECT s.run_id, e.event, s.kind, s.step, 1, NULL, s.started_at + e.off
FROM {s}.step_runs s
CROSS JOIN (VALUES ('step_ready', interval '0'), ('step_started', interval '0.1 second'),
                   ('step_completed', interval '1 second')) AS e(event, off)
"""

LOAD_OUTBOX = """
INSERT INTO {s}.outbox (run_id, kind, step, attempt, queue, available_at)
SELECT run_id, kind, step, 2, 'saga', now() - interval '90 seconds'
FROM {s}.step_runs WHERE state = 'waiting' LIMIT 5000
"""


def scratch(name: str) -> str:
    """Create (or recreate) database ``name`` on the server and return its libpq URL."""
    with psycopg.connect(SERVER, autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return make_url(SERVER).set(database=name).render_as_string(hide_password=False)


def load(url: str, n: int, schema: str) -> None:
    """Migrate and fill the database with ``n`` runs and their satellites."""
    from saga.db import migrate

    sa_url = make_url(url).set(drivername="postgresql+psycopg")
    engine = create_engine(sa_url)
    migrate.upgrade(engine, schema=schema)
    s = f'"{schema}"'
    with psycopg.connect(url, autocommit=True) as conn:
        for label, stmt in (
            ("runs", LOAD_RUNS),
            ("step_runs", LOAD_STEPS),
            ("history", LOAD_HISTORY),
            ("outbox", LOAD_OUTBOX),
        ):
            start = time.perf_counter()
            text = stmt.replace("{s}", s).replace("{{", "{").replace("}}", "}")
            cur = conn.execute(text.encode(), {"n": n} if "%(n)s" in text else None)
            print(f"loaded {cur.rowcount:>9,} {label:<10} in {time.perf_counter() - start:6.1f}s")
        # The insert trigger wrote a count delta per finished run: fold them as the relay would.
        start = time.perf_counter()
        tables = Tables(schema)
        with engine.begin() as sa_conn:
            folded = 0
            while (n_folded := counts.fold_in_tx(sa_conn, tables, limit=1_000_000)) > 0:
                folded += n_folded
        print(f"folded   {folded:>9,} count deltas in {time.perf_counter() - start:6.1f}s")
        start = time.perf_counter()
        conn.execute(f"VACUUM (ANALYZE) {s}.runs, {s}.step_runs, {s}.history, {s}.outbox".encode())
        print(f"vacuum analyze          in {time.perf_counter() - start:6.1f}s")
    engine.dispose()


def time_cli(url: str, schema: str, args: list[str], repeat: int) -> tuple[float, float, str]:
    """Best and median wall time of ``saga ARGS`` as a subprocess, and its first line."""
    env = {**os.environ, "SAGA_DATABASE_URL": url, "SAGA_SCHEMA": schema}
    times: list[float] = []
    first = ""
    for _ in range(repeat):
        start = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "saga.cli.main", "--plain", *args],
            env=env, capture_output=True, text=True, check=False,
        )
        times.append(time.perf_counter() - start)
        if proc.returncode != 0:
            raise SystemExit(f"saga {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        first = proc.stdout.splitlines()[0] if proc.stdout else ""
    return min(times), statistics.median(times), first


def time_queries(url: str, schema: str, run_ref: str, repeat: int) -> dict[str, float]:
    """Best in-process time of each command's queries (no interpreter start-up)."""
    from saga.cli import queries
    from saga.db.states import RUN_STATES
    from saga.store.base import Tables

    tables = Tables(schema)
    engine = create_engine(make_url(url).set(drivername="postgresql+psycopg"))
    out: dict[str, float] = {}
    jobs = {
        "overview counts": lambda c: queries.counts(c, tables, RUN_STATES),
        "overview other": lambda c: (
            queries.backlog(c, tables),
            queries.expired_leases(c, tables, 10),
            queries.waiting_for_operator(c, tables, 10),
        ),
        "list --state failed": lambda c: queries.list_runs(
            c, tables, queries.ListFilter(states=("failed",), limit=51)
        ),
        "list (two states)": lambda c: queries.list_runs(
            c, tables, queries.ListFilter(states=("failed", "compensation_failed"), limit=51)
        ),
        "find run by key": lambda c: queries.find_run(c, tables, run_ref),
        "runs gauge (counters + index)": lambda c: counts.runs_by_state(c, tables),
        "  its finished part (run_counts)": lambda c: c.execute(
            tables.sql(counts._FINISHED)
        ).all(),
        "  its unfinished part (index)": lambda c: c.execute(
            tables.sql(counts._UNFINISHED), {"states": list(counts.UNFINISHED)}
        ).all(),
        "active runs (the unfinished states)": lambda c: c.exec_driver_sql(
            f"SELECT count(*) FROM \"{schema}\".runs WHERE state IN "
            "('running', 'compensating', 'cancelling', 'compensation_failed')"
        ).scalar(),
        "plain GROUP BY": lambda c: c.exec_driver_sql(
            f'SELECT workflow, state, count(*) FROM "{schema}".runs GROUP BY 1, 2'
        ).all(),
    }
    with engine.connect() as conn:
        for name, job in jobs.items():
            best = float("inf")
            for _ in range(repeat):
                start = time.perf_counter()
                job(conn)
                best = min(best, time.perf_counter() - start)
            out[name] = best
    engine.dispose()
    return out


def main() -> None:
    """Parse arguments, load, time, print."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=1_000_000)
    parser.add_argument("--database", default="saga_bench", help="scratch database to create")
    parser.add_argument("--database-url", help="use this database instead of a scratch one")
    parser.add_argument("--schema", default="saga")
    parser.add_argument("--no-load", action="store_true", help="time an already loaded database")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--keep", action="store_true", help="keep the scratch database")
    opts = parser.parse_args()

    url = opts.database_url or (SERVER if opts.no_load else scratch(opts.database))
    if opts.no_load and not opts.database_url:
        url = make_url(SERVER).set(database=opts.database).render_as_string(hide_password=False)
    try:
        if not opts.no_load:
            load(url, opts.runs, opts.schema)
        with psycopg.connect(url) as conn:
            row = conn.execute(
                f'SELECT business_key FROM "{opts.schema}".runs r WHERE business_key IS NOT NULL '
                f'AND EXISTS (SELECT 1 FROM "{opts.schema}".step_runs s WHERE s.run_id = r.id) '
                "ORDER BY created_at DESC LIMIT 1".encode()
            ).fetchone()
        ref = str(row[0]) if row else "key-2"
        print(f"\nsaga CLI as a subprocess (best / median of {opts.repeat}):")
        for args in (["status"], ["list", "--state", "failed"], ["status", ref]):
            best, median, _ = time_cli(url, opts.schema, args, opts.repeat)
            print(f"  saga {' '.join(args):<28} {best * 1000:7.0f} ms / {median * 1000:7.0f} ms")
        base, _, _ = time_cli(url, opts.schema, ["--help"], opts.repeat)
        print(f"  saga --help (start-up only)  {base * 1000:7.0f} ms")
        print("\nqueries in process (best):")
        for name, secs in time_queries(url, opts.schema, ref, opts.repeat).items():
            print(f"  {name:<30} {secs * 1000:7.1f} ms")
    finally:
        if not opts.keep and not opts.database_url and not opts.no_load:
            with psycopg.connect(SERVER, autocommit=True) as conn:
                conn.execute(
                    sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                        sql.Identifier(opts.database)
                    )
                )


if __name__ == "__main__":
    main()
