"""Where a worker's CPU goes on the hot path, measured in-process (no broker, no Celery).

    .venv/bin/python bench/profile_worker.py [--runs 300] [--no-chain] [--top 25]

Starts ``--runs`` linear runs of 3 no-op steps in a scratch database (``saga_bench_prof``,
recreated), then executes them the way a Celery worker's ``saga.execute`` task does:
``Executor.execute(message)`` for each run's first message, with in-process chaining on (a
worker consuming the steps' queue) unless ``--no-chain``. It prints the client-side CPU time
per step (``time.process_time``, which other load on the machine barely moves) and the
functions that take it, from ``cProfile``. The server's side of each statement is not in it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import PG_DSN, recreate_database  # noqa: E402

DB_NAME = "saga_bench_prof"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"


class NullPublisher:
    """Accepts every message and drops it (the chained steps need none)."""

    def publish(self, envelope: Any) -> None:
        """Drop it."""


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=300)
    ap.add_argument("--no-chain", action="store_true", help="one delivery per step")
    ap.add_argument("--top", type=int, default=25, help="functions to list")
    ap.add_argument("--no-profile", action="store_true", help="time only, without cProfile")
    args = ap.parse_args(argv)

    import psycopg

    recreate_database(DB_NAME, URL)
    import saga
    from bench import apps
    from saga.executor import Executor

    engine = saga.Saga(apps.registry, database_url=URL)
    queues = None if args.no_chain else (lambda: {apps.QUEUE})
    executor = Executor(engine, publisher=NullPublisher, queues=queues)
    with engine.engine.begin() as conn:
        ids = [engine.start(conn, apps.linear, {}).run_id for _ in range(args.runs + 1)]
    side = psycopg.connect(PG_DSN + f" dbname={DB_NAME}", autocommit=True)
    fields = ("run_id", "workflow", "version", "kind", "step", "attempt")

    def pending() -> list[dict[str, Any]]:
        rows = side.execute(
            "SELECT o.run_id::text, r.workflow, r.version, o.kind, o.step, o.attempt "
            "FROM saga.outbox o JOIN saga.runs r ON r.id = o.run_id ORDER BY o.id"
        ).fetchall()
        side.execute("DELETE FROM saga.outbox")  # delivered: as the relay marks them
        return [dict(zip(fields, r, strict=True)) for r in rows]

    messages = pending()
    executor.execute(messages.pop())  # connect and warm up outside the measurement
    profile = cProfile.Profile()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    if not args.no_profile:
        profile.enable()
    while messages:
        for message in messages:
            assert executor.execute(message) == "completed"
        messages = pending()  # without chaining, the next steps' messages
    profile.disable()
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    steps = args.runs * 3
    done = side.execute(
        "SELECT count(*) FROM saga.runs WHERE state = 'completed' AND id = ANY(%s::uuid[])",
        (ids,),
    ).fetchone()
    side.close()
    engine.engine.dispose()
    assert done is not None and done[0] == len(ids), done
    print(f"{args.runs} linear runs, {steps} steps, chaining {'off' if args.no_chain else 'on'}")
    how = "unprofiled" if args.no_profile else "profiled, so slower than unprofiled"
    print(f"client CPU per step: {cpu / steps * 1000:.3f} ms; wall per step: "
          f"{wall / steps * 1000:.3f} ms ({how})")
    if not args.no_profile:
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print(out.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
