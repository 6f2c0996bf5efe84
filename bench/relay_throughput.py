"""How many outbox rows a relay publishes per second to Redis, and what bounds it.

    .venv/bin/python bench/relay_throughput.py [--rows 20000] [--batch 200] [--port 6396]

Writes ``--rows`` ready first-step messages into the outbox of a scratch database
(``saga_bench_relay``, recreated: one linear run each, started 1,000 per transaction), starts a
private ``redis-server`` on ``--port`` (nothing kept on disk), and runs the relay's own loop
body, ``Relay.publish_batch()`` with the real ``CeleryPublisher``, in this process until the
outbox has nothing left to publish. Prints rows/s, the broker's queue length (every row must be
there once), and where the relay's time goes: taking and marking batches (the database) versus
publishing (Celery and Redis), from timers around each part. ``--profile`` adds the top
functions from ``cProfile``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import recreate_database  # noqa: E402

DB_NAME = "saga_bench_relay"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"


class Timed:
    """Wraps a publisher and adds up the time spent publishing."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.seconds = 0.0
        self.calls = 0

    def publish(self, envelope: Any) -> None:
        t0 = time.perf_counter()
        self.inner.publish(envelope)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def publish_many(self, envelopes: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return self.inner.publish_many(envelopes)
        finally:
            self.seconds += time.perf_counter() - t0
            self.calls += 1


def measure(  # noqa: PLR0915 - a linear script
    rows: int, batch: int, port: int, profile: bool = False, pipelined: bool = True
) -> dict[str, Any]:
    """Publish ``rows`` outbox rows with the relay to a private Redis on ``port``; the
    figures (and the cProfile listing with ``profile``). ``pipelined``: as the relay's loop
    does (``publish_backlog``: the next batch taken while one is published); else one batch
    at a time (``publish_batch``), database and broker one after the other."""
    import redis
    from celery import Celery

    redis_proc = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        client = redis.Redis(port=port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        recreate_database(DB_NAME, URL)
        import saga
        from bench import apps
        from saga.celery_adapter import CeleryPublisher
        from saga.relay import Relay

        engine = saga.Saga(apps.registry, database_url=URL)
        left = rows
        while left:
            with engine.engine.begin() as conn:
                for _ in range(min(1000, left)):
                    engine.start(conn, apps.linear, {})
                    left -= 1
        app = Celery("relay-bench", broker=f"redis://127.0.0.1:{port}/0")
        publisher = Timed(CeleryPublisher(app))
        relay = Relay(engine, publisher, batch_size=batch)
        warm = relay.publish_batch()  # connect outside the measurement
        publisher.seconds = 0.0
        profiler = cProfile.Profile()
        if profile:
            profiler.enable()
        t0 = time.perf_counter()
        published, batches = 0, 0
        while True:
            if pipelined:
                n, _ = relay.publish_backlog(seconds=3600.0)
                batches += -(-n // batch)
            else:
                n = relay.publish_batch()
                batches += 1
            if n == 0:
                break
            published += n
        elapsed = time.perf_counter() - t0
        if profile:
            profiler.disable()
        queued = client.llen("saga")
        engine.engine.dispose()
        # One batch at a time, what is not publishing is the database's (and making the
        # messages); pipelined, the two overlap and this is what is left of it.
        database = elapsed - publisher.seconds
        out: dict[str, Any] = {
            "pipelined": pipelined,
            "rows": published,
            "batches": batches,
            "rows_per_s": round(published / elapsed),
            "publish_us_per_row": round(publisher.seconds / published * 1e6),
            "db_ms_per_batch": round(database / batches * 1000, 1),
            "broker_queue": queued,
            "all_there_once": queued == published + warm,
        }
        if profile:
            listing = io.StringIO()
            pstats.Stats(profiler, stream=listing).sort_stats("cumulative").print_stats(30)
            out["profile"] = listing.getvalue()
        return out
    finally:
        redis_proc.terminate()
        redis_proc.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=20000)
    ap.add_argument("--batch", type=int, default=200)
    ap.add_argument("--port", type=int, default=6396)
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--one-at-a-time", action="store_true",
                    help="also measure one batch at a time (publish_batch), for comparison")
    args = ap.parse_args(argv)
    ok = True
    for pipelined in (True, False) if args.one_at_a_time else (True,):
        out = measure(args.rows, args.batch, args.port, args.profile, pipelined=pipelined)
        how = "pipelined (the relay's loop)" if pipelined else "one batch at a time"
        print(f"{how}: {out['rows']} rows published in {out['batches']} batches of up to "
              f"{args.batch}: {out['rows_per_s']:,} rows/s (every row on the broker once: "
              f"{out['all_there_once']})")
        print(f"  publishing (Celery + Redis, its own thread): {out['publish_us_per_row']} us "
              "per row")
        print(f"  the rest (taking and marking batches, making messages), not overlapped: "
              f"{out['db_ms_per_batch']} ms per batch")
        if args.profile:
            print(out["profile"])
        ok = ok and out["all_there_once"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
