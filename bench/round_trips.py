"""Database round trips and commits on one step's path, counted in-process.

    .venv/bin/python bench/round_trips.py [--batch 100]

Drives saga in this process against a scratch database (``saga_bench_rt``, recreated): starts
a run, publishes with ``saga.relay.Relay(...).publish_batch()`` and a dummy publisher, and
executes step messages with ``saga.executor.Executor(saga).execute(message)``, where a message
is built from the outbox row joined with its run, exactly as the relay builds it.

The engine is the one ``saga.Saga(registry, database_url=...)`` creates by default (pool of
5 + 5, no pre-ping). The chained phases run an executor that consumes the steps' queue, as a
Celery worker does: a completion claims the next step in its own transaction. Two counts per phase:

- SQLAlchemy level: ``before_cursor_execute`` (statements), ``begin``/``commit``/``rollback``
  events, and pre-pings (``dialect.do_ping`` wrapped here), which no cursor event sees;
- wire level, the ground truth: every connection is traced with libpq's ``PQtrace``; a round
  trip is one ``Query`` or ``Sync`` message from the client (each answered by a
  ``ReadyForQuery``), a commit is a round trip after which the server is outside a transaction
  (``ReadyForQuery I``) other than a ``ROLLBACK`` - i.e. a ``COMMIT`` or a statement run in
  autocommit mode, which PostgreSQL counts in ``xact_commit`` alike. psycopg's implicit
  ``BEGIN`` is a round trip of its own and is counted.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import event

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import PG_DSN, recreate_database  # noqa: E402

DB_NAME = "saga_bench_rt"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"


class DummyPublisher:
    """Accepts every message in-process."""

    def __init__(self) -> None:
        self.sent: list[Any] = []

    def publish(self, envelope: Any, **_: Any) -> None:
        self.sent.append(envelope)


class Counters:
    """SQLAlchemy events and libpq traces of one engine's connections."""

    def __init__(self, engine: Any) -> None:
        self.tracedir = Path(tempfile.mkdtemp(prefix="saga-rt-"))
        self.sa: Counter[str] = Counter()
        self.statements: list[str] = []
        self._traces: list[Path] = []

        @event.listens_for(engine, "connect")
        def _connect(dbapi_conn: Any, _rec: Any) -> None:
            path = self.tracedir / f"conn{len(self._traces)}.trace"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            dbapi_conn.pgconn.trace(fd)
            self._traces.append(path)

        @event.listens_for(engine, "before_cursor_execute")
        def _stmt(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
            self.sa["statements"] += 1
            self.statements.append(" ".join(statement.split())[:90])

        for name in ("begin", "commit", "rollback"):
            event.listen(engine, name, self._counter(name))

        ping = engine.dialect.do_ping

        def counted_ping(dbapi_conn: Any) -> bool:
            self.sa["pre-pings"] += 1
            return bool(ping(dbapi_conn))

        engine.dialect.do_ping = counted_ping  # this script's engine only

    def _counter(self, name: str) -> Any:
        def count(*_: Any) -> None:
            self.sa[name] += 1

        return count

    def offsets(self) -> dict[Path, int]:
        """How much of each trace has been written so far."""
        return {p: p.stat().st_size for p in self._traces}

    def wire(self) -> list[tuple[Path, int, str, str, str]]:
        """Every round trip so far: (trace, offset of the client's message, time, start of the
        query, ReadyForQuery status). A trip belongs to the phase its client message was sent
        in; its ReadyForQuery may be traced later, when libpq reads it."""
        trips: list[tuple[Path, int, str, str, str]] = []
        for path in self._traces:
            data = path.read_bytes().decode(errors="replace")
            # A statement's newlines are written as they are: re-join continuation lines.
            lines: list[tuple[int, str]] = []
            pos = 0
            for line in data.split("\n"):
                if line[:4].isdigit() or not lines:
                    lines.append((pos, line))
                else:
                    lines[-1] = (lines[-1][0], lines[-1][1] + " " + line)
                pos += len(line.encode()) + 1
            open_trip: list[Any] | None = None
            query = ""
            for offset, line in lines:
                parts = line.split("\t")
                if len(parts) < 4:
                    continue
                stamp, direction, msg = parts[0], parts[1], parts[3]
                rest = parts[4].strip() if len(parts) > 4 else ""
                if direction == "F" and msg == "Query":
                    open_trip = [path, offset, stamp, rest.split('"')[1], "?"]
                elif direction == "F" and msg == "Parse":
                    query = rest.split('"')[3]
                elif direction == "F" and msg == "Sync":
                    open_trip = [path, offset, stamp, query, "?"]
                elif direction == "B" and msg == "ReadyForQuery" and open_trip is not None:
                    open_trip[4] = rest
                    open_trip[3] = " ".join(open_trip[3].split())[:70]
                    trips.append(tuple(open_trip))
                    open_trip = None
        return sorted(trips, key=lambda t: t[2])

    def mark(self) -> tuple[Counter[str], dict[Path, int]]:
        return Counter(self.sa), self.offsets()


def measure(counters: Counters, label: str, fn: Any, rows: list[dict[str, Any]]) -> Any:
    sa0, since = counters.mark()
    out = fn()
    sa1 = Counter(counters.sa)
    until = counters.offsets()
    rows.append(
        {
            "phase": label,
            "sql_statements": sa1["statements"] - sa0["statements"],
            "sa_begin": sa1["begin"] - sa0["begin"],
            "sa_commit": sa1["commit"] - sa0["commit"],
            "pre_pings": sa1["pre-pings"] - sa0["pre-pings"],
            "since": since,
            "until": until,
        }
    )
    return out


def wire_counts(counters: Counters, rows: list[dict[str, Any]]) -> None:
    """Attribute the traced round trips to the phases (after the fact: see Counters.wire)."""
    everything = counters.wire()
    for row in rows:
        since, until = row.pop("since"), row.pop("until")
        trips = [
            (q, status)
            for path, off, _, q, status in everything
            if since.get(path, 0) <= off < until.get(path, 0)
        ]
        _summarize(row, trips)


def _summarize(row: dict[str, Any], trips: list[tuple[str, str]]) -> None:
    def is_ping(q: str) -> bool:
        return q.strip(" ;").upper() in ("", "SELECT 1")

    pings = sum(1 for q, _ in trips if is_ping(q))
    rollbacks = sum(1 for q, _ in trips if q.upper() == "ROLLBACK")
    begins = sum(1 for q, _ in trips if q.upper().startswith("BEGIN"))
    # Transactions that did something: a COMMIT, or a statement in autocommit mode.
    commits = sum(
        1
        for q, status in trips
        if status == "I" and q.upper() not in ("ROLLBACK", "DEALLOCATE ALL") and not is_ping(q)
    )
    # What pg_stat_database.xact_commit counts besides: the pre-ping's empty query and
    # DEALLOCATE ALL outside a transaction each count as a (WAL-free) commit there.
    xact_commit = commits + sum(
        1 for q, status in trips if status == "I" and (is_ping(q) or q.upper() == "DEALLOCATE ALL")
    )
    row.update(
        {
            "round_trips": len(trips),
            "wire_begin": begins,
            "wire_ping": pings,
            "server_commits": commits,
            "xact_commit": xact_commit,
            "server_rollbacks": rollbacks,
            "trips": trips,
        }
    )


def timing(n: int) -> None:
    """Wall time per step (claim + no-op + complete) executed in-process, with the default
    engine (pool_pre_ping=True) and with pool_pre_ping=False; alternated, best of 3."""
    import time

    from sqlalchemy import create_engine

    import saga
    from bench import apps
    from saga.executor import Executor

    results: dict[bool, list[float]] = {True: [], False: []}
    side = psycopg.connect(PG_DSN + f" dbname={DB_NAME}", autocommit=True)
    for _ in range(3):
        for ping in (True, False):
            eng = saga.Saga(
                apps.registry,
                engine=create_engine(URL, pool_size=5, max_overflow=5, pool_pre_ping=ping),
            )
            ex = Executor(eng)
            with eng.engine.begin() as conn:
                ids = [eng.start(conn, apps.linear, {}).run_id for _ in range(n)]
            msgs = [
                dict(
                    zip(
                        ("run_id", "workflow", "version", "kind", "step", "attempt"), r, strict=True
                    )
                )
                for r in side.execute(
                    "SELECT o.run_id::text, r.workflow, r.version, o.kind, o.step, o.attempt "
                    "FROM saga.outbox o JOIN saga.runs r ON r.id = o.run_id "
                    "WHERE o.run_id = ANY(%s::uuid[])",
                    (ids,),
                ).fetchall()
            ]
            ex.execute(msgs.pop())  # connect outside the timing
            t0 = time.perf_counter()
            for m in msgs:
                assert ex.execute(m) == "completed"
            results[ping].append((time.perf_counter() - t0) / len(msgs) * 1000)
            eng.engine.dispose()
    side.close()
    on, off = min(results[True]), min(results[False])
    print(f"\nin-process step (claim + no-op + complete), best of 3 x {n - 1} steps:")
    print(f"  pool_pre_ping=True (default): {on:.3f} ms/step")
    print(f"  pool_pre_ping=False:          {off:.3f} ms/step ({(1 - off / on) * 100:.0f}% less)")


def main(argv: list[str] | None = None) -> int:  # noqa: PLR0915 - a linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=100, help="messages in the measured relay batch")
    ap.add_argument("-v", "--verbose", action="store_true", help="list every round trip")
    ap.add_argument(
        "--timing",
        type=int,
        default=0,
        metavar="N",
        help="also time N first steps in-process, with and without pool_pre_ping",
    )
    args = ap.parse_args(argv)

    recreate_database(DB_NAME, URL)
    import saga
    from bench import apps
    from saga.executor import Executor
    from saga.relay import Relay

    engine = saga.Saga(apps.registry, database_url=URL)
    counters = Counters(engine.engine)
    executor = Executor(engine)
    relay = Relay(engine, DummyPublisher(), batch_size=max(200, args.batch))
    side = psycopg.connect(PG_DSN + f" dbname={DB_NAME}", autocommit=True)  # untraced

    def message(run_id: str, step: str) -> dict[str, Any]:
        row = side.execute(
            "SELECT o.run_id::text, r.workflow, r.version, o.kind, o.step, o.attempt "
            "FROM saga.outbox o JOIN saga.runs r ON r.id = o.run_id "
            "WHERE o.run_id = %s AND o.step = %s",
            (run_id, step),
        ).fetchone()
        assert row is not None, (run_id, step)
        keys = ("run_id", "workflow", "version", "kind", "step", "attempt")
        return dict(zip(keys, row, strict=True))

    def start_one(wf: Any) -> str:
        with engine.engine.begin() as conn:
            return engine.start(conn, wf, {}).run_id

    def run_step(run_id: str, step: str) -> str:
        return executor.execute(message(run_id, step))

    # Warm the pool up so that connecting is not counted.
    for _ in range(3):
        measure(counters, "warm-up", lambda: start_one(apps.linear), [])
    relay.publish_batch()

    rows: list[dict[str, Any]] = []
    run = measure(
        counters, "start one linear run (own transaction)", lambda: start_one(apps.linear), rows
    )
    measure(counters, "relay: publish_batch() of 1 message", relay.publish_batch, rows)
    out = measure(
        counters, "first step: claim + run + complete", lambda: run_step(run, "first"), rows
    )
    assert out == "completed", out
    out = measure(
        counters, "middle step: claim + run + complete", lambda: run_step(run, "second"), rows
    )
    assert out == "completed", out
    out = measure(
        counters,
        "last step: claim + run + complete (+ finish run)",
        lambda: run_step(run, "third"),
        rows,
    )
    assert out == "completed", out

    fan = start_one(apps.fan)
    branches = [f"branch_{i}" for i in range(apps.FAN_WIDTH)]
    for b in branches[:-2]:
        run_step(fan, b)
    measure(
        counters, "fan: a branch (join still waiting)", lambda: run_step(fan, branches[-2]), rows
    )
    measure(
        counters,
        "fan: last branch (makes the join ready)",
        lambda: run_step(fan, branches[-1]),
        rows,
    )
    measure(counters, "fan: join (finishes the run)", lambda: run_step(fan, "join"), rows)

    # In-process chaining, as a Celery worker consuming the queue does it.
    chaining = Executor(engine, queues=lambda: {apps.QUEUE})
    chained = start_one(apps.linear)
    out = measure(
        counters,
        "chained: one delivery runs all 3 linear steps",
        lambda: chaining.execute(message(chained, "first")),
        rows,
    )
    assert out == "completed", out
    fan_chained = start_one(apps.fan)
    for b in branches[:-1]:
        chaining.execute(message(fan_chained, b))
    measure(
        counters,
        "chained: fan's last branch + the join it chains",
        lambda: chaining.execute(message(fan_chained, branches[-1])),
        rows,
    )

    with engine.engine.begin() as conn:
        for _ in range(args.batch):
            engine.start(conn, apps.linear, {})
    published = measure(
        counters, f"relay: publish_batch() of {args.batch} messages", relay.publish_batch, rows
    )
    assert published == args.batch, published

    def next_due() -> float | None:  # what Relay._wait does before it listens
        with relay.saga.engine.connect() as conn:
            return relay.saga.lifecycle.outbox.seconds_to_next_due(conn)

    measure(counters, "relay: idle loop, empty publish_batch()", relay.publish_batch, rows)
    measure(counters, "relay: idle loop, next-due query (_wait)", next_due, rows)

    with engine.engine.connect() as conn:  # lets libpq read (and trace) the last replies
        conn.exec_driver_sql("SELECT 1").scalar()
    wire_counts(counters, rows)
    for run_id in (run, fan, chained, fan_chained):
        state = side.execute(
            "SELECT state, finished_at IS NOT NULL FROM saga.runs WHERE id = %s", (run_id,)
        ).fetchone()
        assert state == ("completed", True), state

    print(
        f"{'phase':52} {'stmts':>5} {'pings':>5} {'BEGIN':>5} {'trips':>5} "
        f"{'commits':>7} {'xact_c':>6} {'rollb':>5}"
    )
    for r in rows:
        print(
            f"{r['phase']:52} {r['sql_statements']:>5} {r['pre_pings']:>5} "
            f"{r['wire_begin']:>5} {r['round_trips']:>5} {r['server_commits']:>7} "
            f"{r['xact_commit']:>6} {r['server_rollbacks']:>5}"
        )
        if args.verbose:
            for q, status in r["trips"]:
                print(f"      [{status}] {q}")
    print(
        "\nstmts: SQLAlchemy before_cursor_execute; pings: pool pre-pings (an empty query ';'); "
        "BEGIN: psycopg's implicit BEGIN round trips;\ntrips: all round trips on the wire "
        "(libpq trace); commits: transactions the server committed (COMMIT or an "
        "autocommit statement);\nxact_c: what pg_stat_database.xact_commit "
        "adds (commits + empty pre-ping and DEALLOCATE ALL transactions, which write no WAL);"
        "\nrollb: ROLLBACK round trips (connection returned to the pool)."
    )
    if args.timing:
        timing(args.timing)
    side.close()
    engine.engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
