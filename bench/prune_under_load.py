"""The hot path's throughput while ``saga prune`` deletes a million finished runs.

    .venv/bin/python bench/prune_under_load.py [--runs 1112000 --round 1000 --private-redis 6392]

1. recreates the scratch database ``saga_bench`` (as ``bench/throughput.py`` does) and loads
   ``--runs`` old runs into it with ``bench/load_runs.py``'s loader (a spread of states over
   60 days, with steps, history and an outbox backlog; 90% of them finished, so the
   default gives about 1,000,000 finished runs); the loaded backlog's outbox rows and leases
   are cleared so that the relay and the sweeper do not work on them;
2. starts the relay and one worker (``-c 2``) like ``bench/throughput.py``;
3. measures rounds of ``--round`` linear runs of 3 no-op steps (all submitted at once; runs
   per second from the first submission to the last run's ``finished_at``): ``--before``
   rounds, then rounds back to back while ``saga prune --finished-before 1d --yes`` runs as a
   subprocess, then ``--after`` rounds;
4. prints each round, the prune's rate, the drop (mean during / mean of before and after),
   and checks that every unfinished loaded run is still there.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psycopg
import redis

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import load_runs, throughput  # noqa: E402

UNFINISHED = "('running', 'compensating', 'cancelling', 'compensation_failed')"


def use_database(name: str) -> str:
    """Point ``bench/throughput.py``'s helpers (and the processes) at database ``name``
    (not ``saga_bench``, which ``bench/throughput.py`` itself uses); its libpq URL."""
    throughput.DB_NAME = name
    throughput.DATABASE_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    os.environ["SAGA_DATABASE_URL"] = throughput.DATABASE_URL
    return f"postgresql://postgres@127.0.0.1:5432/{name}"


def prepare(n: int, url: str) -> int:
    """Recreate and fill the database; how many unfinished runs were loaded."""
    throughput.recreate_database(throughput.DB_NAME, throughput.DATABASE_URL)
    load_runs.load(url, n, "saga")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("DELETE FROM saga.outbox")
        conn.execute("UPDATE saga.step_runs SET lease_expires_at = NULL WHERE state = 'running'")
        # The sweeper would move the loaded stopping runs on, and their workflows are not
        # registered: they stay unfinished, as running runs with nothing to do.
        conn.execute(
            "UPDATE saga.runs SET state = 'running' WHERE state IN ('compensating', 'cancelling')"
        )
        conn.execute("VACUUM (ANALYZE) saga.runs, saga.run_counts, saga.run_count_deltas")
        row = conn.execute(f"SELECT count(*) FROM saga.runs WHERE state IN {UNFINISHED}")
        found = row.fetchone()
    assert found is not None
    return int(found[0])


def counts(url: str) -> dict[str, int]:
    """Rows of each table, and the unfinished runs."""
    with psycopg.connect(url) as conn:
        out = {
            t: int(conn.execute(f"SELECT count(*) FROM saga.{t}").fetchone()[0])  # type: ignore[index]
            for t in ("runs", "step_runs", "history")
        }
        out["unfinished"] = int(
            conn.execute(f"SELECT count(*) FROM saga.runs WHERE state IN {UNFINISHED}")
            .fetchone()[0]  # type: ignore[index]
        )
    return out


def one_round(side: throughput.SagaSide, size: int) -> float:
    """Runs per second of ``size`` linear runs submitted at once."""
    t0 = time.time()
    ids = side.start_runs(side.apps.linear, size)
    side.started += size  # type: ignore[attr-defined]
    side.wait_done(ids, timeout=max(120.0, size / 2))
    return size / (side.last_finished(ids) - t0)


def main() -> int:  # noqa: PLR0915 - a linear script
    """Parse arguments, load, measure, print."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=1_112_000, help="runs to load (old)")
    ap.add_argument("--round", type=int, default=1000, help="linear runs per round")
    ap.add_argument("--before", type=int, default=3)
    ap.add_argument("--after", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=500, help="saga prune --batch-size")
    ap.add_argument("--pause", type=float, default=0.0, help="saga prune --pause")
    ap.add_argument("--private-redis", type=int, metavar="PORT")
    ap.add_argument("--database", default="saga_bench_prune", help="scratch database")
    args = ap.parse_args()

    logdir = Path(tempfile.mkdtemp(prefix="saga-prune-bench-"))
    procs = throughput.Procs(logdir)
    if args.private_redis:
        throughput.REDIS_URL = f"redis://127.0.0.1:{args.private_redis}/4"
        procs.start("redis", ["redis-server", "--port", str(args.private_redis), "--bind",
                              "127.0.0.1", "--save", "", "--appendonly", "no"])
        client = redis.Redis.from_url(throughput.REDIS_URL)
        throughput.wait_until(lambda: throughput._pings(client), 10, "redis", procs)
    os.environ["BENCH_REDIS_URL"] = throughput.REDIS_URL
    print(f"load average at start: {os.getloadavg()}", flush=True)
    url = use_database(args.database)
    unfinished = prepare(args.runs, url)
    before_rows = counts(url)
    print(f"loaded: {before_rows}", flush=True)
    redis.Redis.from_url(throughput.REDIS_URL).flushdb()
    celery = str(Path(sys.executable).with_name("celery"))
    side: throughput.SagaSide | None = None
    res: dict[str, Any] = {"before": [], "during": [], "after": []}
    try:
        procs.start("relay", [
            sys.executable, "-c",
            "import logging, sys; logging.basicConfig(level=logging.WARNING); "
            f"import saga.relay; sys.exit(saga.relay.main({throughput.APP_SPEC!r}))",
        ])
        procs.start("worker", [celery, "-A", throughput.APP_SPEC, "worker", "-P", "prefork",
                               "-c", "2", "-Q", "saga", "--loglevel=WARNING", "-n", "bench@%h"])
        side = throughput.SagaSide(procs, 100)
        side.started = 50  # type: ignore[attr-defined]  # runs started here, not pruned
        side.wait_done(side.start_runs(side.apps.linear, 50), timeout=90)  # warm up
        for _ in range(args.before):
            res["before"].append(one_round(side, args.round))
            print(f"before: {res['before'][-1]:.1f} runs/s", flush=True)
        env = {**os.environ, "SAGA_DATABASE_URL": url}
        t0 = time.monotonic()
        prune = subprocess.Popen(
            [str(Path(sys.executable).with_name("saga")), "prune", "--finished-before", "1d",
             "--yes", "--batch-size", str(args.batch_size), "--pause", str(args.pause)],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        while prune.poll() is None:
            rate = one_round(side, args.round)
            if prune.poll() is None:  # only rounds that ended with the prune still running
                res["during"].append(rate)
                print(f"during: {rate:.1f} runs/s", flush=True)
        prune_s = time.monotonic() - t0
        out = prune.stdout.read() if prune.stdout else ""
        print(f"prune: {out.strip()} in {prune_s:.1f}s (exit {prune.returncode})", flush=True)
        for _ in range(args.after):
            res["after"].append(one_round(side, args.round))
            print(f"after: {res['after'][-1]:.1f} runs/s", flush=True)
    finally:
        procs.stop()
        if side is not None:
            side.close()
    after_rows = counts(url)
    pruned = before_rows["runs"] - after_rows["runs"] + side.started
    base = statistics.mean(res["before"] + res["after"])
    during = statistics.mean(res["during"]) if res["during"] else float("nan")
    print()
    print(f"runs pruned          {pruned:,} in {prune_s:.0f}s ({pruned / prune_s:,.0f} runs/s)")
    print(f"rows left            {after_rows}")
    print(f"unfinished kept      {after_rows['unfinished']} of {unfinished}")
    print(f"throughput before    {[round(x, 1) for x in res['before']]}")
    print(f"throughput during    {[round(x, 1) for x in res['during']]}")
    print(f"throughput after     {[round(x, 1) for x in res['after']]}")
    print(f"drop during prune    {1 - during / base:.1%} (mean {during:.1f} vs {base:.1f} runs/s)")
    print(f"load average at end  {os.getloadavg()}")
    return 0 if after_rows["unfinished"] == unfinished else 1


if __name__ == "__main__":
    sys.exit(main())
