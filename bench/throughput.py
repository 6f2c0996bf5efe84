"""Execution throughput of saga (outbox relay + Celery workers) against plain Celery.

    .venv/bin/python bench/throughput.py [--runs 2000 --fan-runs 200]

What it does (see docs/benchmarks.md for the method and the figures):

1. drops and creates the scratch database ``saga_bench`` (PostgreSQL on 127.0.0.1:5432, user
   postgres, trust), migrates it, and flushes Redis db 4 (broker and result backend);
2. starts, as subprocesses, the relay (``saga.relay.main("bench.apps:app")``) and ONE worker
   ``celery -A bench.apps:app worker -c 2 -P prefork -Q saga``;
3. warms both paths up, then measures, in this order (each saga workload next to its Celery
   counterpart, so that load from other processes on the machine hits both alike):
   a) saga: ``--runs`` linear runs of 3 no-op steps;   Celery: as many chains of 3 no-op tasks;
   b) saga: ``--fan-runs`` runs of 10 parallel no-op steps (all ready at start) + a join;
      Celery: as many chords of 10 no-op tasks + a no-op body;
   Every run/chain/chord is submitted up front, as fast as the driver can (saga: ``--batch``
   runs per transaction through ``Saga.start(conn, ...)``; Celery: ``apply_async`` in a
   loop); throughput = count / (time the last one finished - time the first was submitted);
   c) the latency from one step's end to the next step's start, from ``step_runs``
      (``finished_at`` of step N -> ``started_at`` of step N+1; for the fan-in, the last
      branch's ``finished_at`` -> the join's ``started_at``), under the load of (a)/(b) and,
      separately, on an idle system (``--probe`` runs started one at a time);
   d) PostgreSQL commits per executed step: the ``xact_commit`` delta of ``saga_bench`` in
      ``pg_stat_database`` over each saga workload, read once the counter has settled (stats
      are flushed by backends at most once a second), minus the background rate of the idle
      relay, divided by the number of steps that ran;
4. prints a table with saga vs Celery and the ratios, and stops the processes it started.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import redis
from sqlalchemy.orm import Session

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench import spy  # noqa: E402

DB_NAME = os.environ.get("SAGA_BENCH_DB", "saga_bench")
"""The scratch database (dropped and created): another name lets two benchmarks run at once."""
PG_DSN = "host=127.0.0.1 port=5432 user=postgres"
DATABASE_URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"
REDIS_URL = "redis://127.0.0.1:6379/4"
APP_SPEC = "bench.apps:app"

# Reference figures quoted in the issue, for this machine (2 cores).
REFERENCE = {
    "celery_chain3_per_s": 270,
    "celery_chord10_per_s": 65,
    "pg_one_row_commits_per_s": 4000,
}


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["SAGA_DATABASE_URL"] = DATABASE_URL
    env["BENCH_REDIS_URL"] = REDIS_URL
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    return env


os.environ.update({k: v for k, v in _env().items() if k != "PYTHONPATH"})


# -- setup ------------------------------------------------------------------------------------


def recreate_database(name: str = DB_NAME, url: str = DATABASE_URL) -> None:
    """Drop and create the scratch database and migrate saga's schema into it."""
    from psycopg import sql

    from saga.db.migrate import upgrade

    with psycopg.connect(PG_DSN + " dbname=postgres", autocommit=True) as conn:
        drop = sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)")
        conn.execute(drop.format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    upgrade(url)


class Procs:
    """The relay and the worker, started here and stopped (by pid) on exit."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, argv: Sequence[str]) -> None:
        log = open(self.logdir / f"{name}.log", "wb")  # noqa: SIM115 - closed with the process
        self.procs[name] = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=_env(),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check(self) -> None:
        for name, p in self.procs.items():
            if p.poll() is not None:
                tail = (self.logdir / f"{name}.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{name} exited with {p.returncode}:\n{tail}")

    def stop(self) -> None:
        """Stop in reverse order of starting: SIGTERM, then SIGKILL to the session the
        process was started in if it has not exited within 20 s."""
        for p in reversed(self.procs.values()):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# -- measuring helpers ------------------------------------------------------------------------


def pctl(values: Sequence[float], q: float) -> float:
    """The ``q`` quantile (0..1) by linear interpolation; NaN for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def ms_summary(seconds: Sequence[float]) -> dict[str, float]:
    """p50/p99/max in milliseconds."""
    return {
        "n": len(seconds),
        "p50_ms": round(pctl(seconds, 0.5) * 1000, 2),
        "p99_ms": round(pctl(seconds, 0.99) * 1000, 2),
        "max_ms": round(max(seconds) * 1000, 2) if seconds else float("nan"),
    }


class Stats:
    """``xact_commit`` of the bench database, read from a session on another database (so the
    reading itself is not counted) with a fresh snapshot each time."""

    def __init__(self) -> None:
        self.conn = psycopg.connect(PG_DSN + " dbname=postgres", autocommit=True)

    def read(self) -> int:
        self.conn.execute("SELECT pg_stat_clear_snapshot()")
        row = self.conn.execute(
            "SELECT xact_commit FROM pg_stat_database WHERE datname = %s", (DB_NAME,)
        ).fetchone()
        assert row is not None
        return int(row[0])

    def settled(
        self, bg_per_s: float = 0.0, window: float = 11.0, deadline: float = 60.0
    ) -> tuple[int, float]:
        """The counter once it has stopped moving (beyond the idle background rate) for
        ``window`` seconds. Backends flush their counts at most once a second while busy, and
        an idle backend flushes only when its idle-flush timer fires (PGSTAT_IDLE_INTERVAL,
        10 s in PostgreSQL 15): a worker's last commits can show up 10 s late.
        Returns (value, monotonic time of the reading)."""
        end = time.monotonic() + deadline
        history = [(time.monotonic(), self.read())]
        while True:
            time.sleep(1.0)
            now, cur = time.monotonic(), self.read()
            history.append((now, cur))
            old = [(t, v) for t, v in history if now - t >= window]
            if old:
                t_old, v_old = old[-1]
                if cur - v_old <= bg_per_s * (now - t_old) + 5 or now > end:
                    return cur, now

    def close(self) -> None:
        self.conn.close()


def wait_until(
    pred: Callable[[], bool], timeout: float, what: str, procs: Procs, interval: float = 0.1
) -> None:
    end = time.monotonic() + timeout
    while not pred():
        procs.check()
        if time.monotonic() > end:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# -- the saga side ----------------------------------------------------------------------------


class SagaSide:
    def __init__(self, procs: Procs, batch: int) -> None:
        from bench import apps

        self.apps = apps
        self.saga = apps.engine
        self.procs = procs
        self.batch = batch
        # Polls run in a transaction that is rolled back: they add no commits to the count.
        self.poll = psycopg.connect(PG_DSN + f" dbname={DB_NAME}")

    def _count_done(self, ids: list[str]) -> tuple[int, int]:
        # The completing statement writes the state, the result and finished_at together.
        row = self.poll.execute(
            "SELECT count(*) FILTER (WHERE state = 'completed' AND finished_at IS NOT NULL), "
            "       count(*) FILTER (WHERE state NOT IN ('running', 'completed')) "
            "FROM saga.runs WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchone()
        self.poll.rollback()
        assert row is not None
        return int(row[0]), int(row[1])

    def _finished(self, run_id: str) -> Callable[[], bool]:
        return lambda: self._count_done([run_id])[0] == 1

    def start_runs(self, workflow: Any, n: int) -> list[str]:
        # Started in a Session, as an application does: once it commits, this process
        # publishes the first steps itself (prompt start), the relay being the fallback.
        ids: list[str] = []
        while len(ids) < n:
            with Session(self.saga.engine) as session, session.begin():
                for _ in range(min(self.batch, n - len(ids))):
                    ids.append(self.saga.start(session, workflow, {}).run_id)
        return ids

    def wait_done(self, ids: list[str], timeout: float) -> None:
        def done() -> bool:
            completed, bad = self._count_done(ids)
            if bad:
                raise RuntimeError(f"{bad} runs ended in a state other than completed")
            return completed == len(ids)

        wait_until(done, timeout, f"{len(ids)} saga runs", self.procs)

    def last_finished(self, ids: list[str]) -> float:
        row = self.poll.execute(
            "SELECT extract(epoch FROM max(finished_at))::float8 FROM saga.runs "
            "WHERE id = ANY(%s::uuid[])",
            (ids,),
        ).fetchone()
        self.poll.rollback()
        assert row is not None
        return float(row[0])

    def steps_done(self, ids: list[str]) -> int:
        row = self.poll.execute(
            "SELECT count(*) FROM saga.step_runs WHERE run_id = ANY(%s::uuid[]) "
            "AND kind = 'step' AND state = 'completed'",
            (ids,),
        ).fetchone()
        self.poll.rollback()
        assert row is not None
        return int(row[0])

    def linear_gaps(self, ids: list[str]) -> list[float]:
        rows = self.poll.execute(
            """
            SELECT extract(epoch FROM (b.started_at - a.finished_at))::float8
            FROM saga.step_runs a JOIN saga.step_runs b
              ON b.run_id = a.run_id AND a.kind = 'step' AND b.kind = 'step'
             AND ((a.step = 'first' AND b.step = 'second')
               OR (a.step = 'second' AND b.step = 'third'))
            WHERE a.run_id = ANY(%s::uuid[])
            """,
            (ids,),
        ).fetchall()
        self.poll.rollback()
        return [r[0] for r in rows]

    def join_gaps(self, ids: list[str]) -> list[float]:
        rows = self.poll.execute(
            """
            SELECT extract(epoch FROM (j.started_at - max(b.finished_at)))::float8
            FROM saga.step_runs j JOIN saga.step_runs b
              ON b.run_id = j.run_id AND b.kind = 'step' AND b.step LIKE 'branch\\_%%'
            WHERE j.run_id = ANY(%s::uuid[]) AND j.kind = 'step' AND j.step = 'join'
            GROUP BY j.run_id, j.started_at
            """,
            (ids,),
        ).fetchall()
        self.poll.rollback()
        return [r[0] for r in rows]

    def workload(self, workflow: Any, n: int, stats: Stats, bg_per_s: float) -> dict[str, Any]:
        before, t_before = stats.settled(bg_per_s)
        t0 = time.time()
        ids = self.start_runs(workflow, n)
        submitted = time.time() - t0
        self.wait_done(ids, timeout=max(120.0, n / 5))
        elapsed = self.last_finished(ids) - t0
        after, t_after = stats.settled(bg_per_s)
        steps = self.steps_done(ids)
        raw = after - before
        background = bg_per_s * (t_after - t_before)
        gaps = self.linear_gaps(ids) if workflow.name == "bench.linear" else self.join_gaps(ids)
        return {
            "count": n,
            "submit_s": round(submitted, 3),
            "elapsed_s": round(elapsed, 3),
            "per_s": round(n / elapsed, 1),
            "steps": steps,
            "steps_per_s": round(steps / elapsed, 1),
            "commits_raw": raw,
            "commits_background_est": round(background, 1),
            "commits_per_step": round((raw - background) / steps, 3),
            "gap": ms_summary(gaps),
        }

    def idle_probe(self, workflow: Any, n: int) -> dict[str, Any]:
        """Runs started one at a time on an otherwise idle engine."""
        ids: list[str] = []
        e2e: list[float] = []
        starts: list[float] = []
        for _ in range(n):
            t0 = time.time()
            with Session(self.saga.engine) as session, session.begin():
                run_id = self.saga.start(session, workflow, {}).run_id
            # The caller's transaction, its commit and the prompt publish after it.
            starts.append(time.time() - t0)
            ids.append(run_id)
            wait_until(self._finished(run_id), 30, "a probe run", self.procs, interval=0.005)
            e2e.append(self.last_finished([run_id]) - t0)
        gaps = self.linear_gaps(ids) if workflow.name == "bench.linear" else self.join_gaps(ids)
        return {"gap": ms_summary(gaps), "end_to_end": ms_summary(e2e),
                "start_and_publish": ms_summary(starts)}

    def close(self) -> None:
        self.poll.close()


# -- the Celery side --------------------------------------------------------------------------


class CelerySide:
    def __init__(self, procs: Procs) -> None:
        from bench import apps

        self.apps = apps
        self.procs = procs
        self.redis = redis.Redis.from_url(REDIS_URL)

    def _submit(self, tag: str, kind: str) -> None:
        from celery import chain, chord

        a = self.apps
        if kind == "chain":
            chain(a.noop.si(), a.noop.si(), a.chain_last.si(tag)).apply_async()
        else:
            chord([a.branch.si(i) for i in range(a.FAN_WIDTH)], a.join.s(tag=tag)).apply_async()

    def workload(self, kind: str, n: int) -> dict[str, Any]:
        self.redis.delete(self.apps.DONE_KEY)
        prefix = uuid.uuid4().hex[:8]
        t0 = time.time()
        for i in range(n):
            self._submit(f"{prefix}-{i}", kind)
        submitted = time.time() - t0
        wait_until(
            lambda: self.redis.llen(self.apps.DONE_KEY) >= n,
            max(120.0, n / 5),
            f"{n} Celery {kind}s",
            self.procs,
        )
        times = [float(x.split()[1]) for x in self.redis.lrange(self.apps.DONE_KEY, 0, -1)]
        elapsed = max(times) - t0
        return {
            "count": n,
            "submit_s": round(submitted, 3),
            "elapsed_s": round(elapsed, 3),
            "per_s": round(n / elapsed, 1),
        }

    def idle_probe(self, kind: str, n: int) -> dict[str, Any]:
        e2e: list[float] = []
        for i in range(n):
            self.redis.delete(self.apps.DONE_KEY)
            t0 = time.time()
            self._submit(f"probe-{i}", kind)
            got = self.redis.blpop([self.apps.DONE_KEY], timeout=30)
            if got is None:
                raise TimeoutError(f"a probe {kind} did not finish")
            e2e.append(float(got[1].split()[1]) - t0)
        return {"end_to_end": ms_summary(e2e)}


# -- odds and ends ----------------------------------------------------------------------------


def one_row_commits_per_s(seconds: float = 2.0) -> float:
    """Autocommit one-row INSERTs on a single connection (the reference's 4,000/s)."""
    with psycopg.connect(PG_DSN + f" dbname={DB_NAME}", autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS public.bench_commit (id bigserial, v int)")
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            conn.execute("INSERT INTO public.bench_commit (v) VALUES (%s)", (n,))
            n += 1
        rate = n / (time.perf_counter() - t0)
        conn.execute("DROP TABLE public.bench_commit")
    return rate


def background_rate(stats: Stats, seconds: float = 12.0) -> float:
    """Commits per second of the idle relay (its poll and sweep transactions)."""
    v0, t0 = stats.settled(bg_per_s=10.0)
    time.sleep(seconds)
    v1, t1 = stats.read(), time.monotonic()
    return max(0.0, (v1 - v0) / (t1 - t0))


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}" if b else "-"


def print_table(res: dict[str, Any]) -> None:
    lin, fan = res["saga"]["linear"], res["saga"]["fan"]
    chn, crd = res["celery"]["chain"], res["celery"]["chord"]
    print()
    print(
        f"machine: {os.cpu_count()} cores; load average at start {res['loadavg_start']}, "
        f"at end {res['loadavg_end']}"
    )
    print(f"{'workload':38} {'saga':>10} {'celery':>10} {'saga/celery':>12}")
    print(
        f"{'3 no-op steps (runs|chains per s)':38} {lin['per_s']:>10} {chn['per_s']:>10} "
        f"{ratio(lin['per_s'], chn['per_s']):>12}"
    )
    print(
        f"{'10+1 fan-in (runs|chords per s)':38} {fan['per_s']:>10} {crd['per_s']:>10} "
        f"{ratio(fan['per_s'], crd['per_s']):>12}"
    )
    pl, pc = res["saga"]["probe_linear"], res["celery"]["probe_chain"]
    pf, pk = res["saga"]["probe_fan"], res["celery"]["probe_chord"]
    print(
        f"{'idle end-to-end p50, 3 steps (ms)':38} {pl['end_to_end']['p50_ms']:>10} "
        f"{pc['end_to_end']['p50_ms']:>10} "
        f"{ratio(pl['end_to_end']['p50_ms'], pc['end_to_end']['p50_ms']):>12}"
    )
    print(
        f"{'idle end-to-end p50, 10+1 (ms)':38} {pf['end_to_end']['p50_ms']:>10} "
        f"{pk['end_to_end']['p50_ms']:>10} "
        f"{ratio(pf['end_to_end']['p50_ms'], pk['end_to_end']['p50_ms']):>12}"
    )
    print(
        "  of which saga's start in the caller's transaction, its commit and the prompt "
        f"publish: p50 {pl['start_and_publish']['p50_ms']} ms (3 steps), "
        f"{pf['start_and_publish']['p50_ms']} ms (10+1)"
    )
    print()
    print("saga step-to-step gap (finished_at -> next started_at; 0 when the next step is "
          "claimed in the completing statement), ms:")
    print(
        f"  linear, under load: p50 {lin['gap']['p50_ms']}  p99 {lin['gap']['p99_ms']}  "
        f"(n={lin['gap']['n']})"
    )
    print(
        f"  join,   under load: p50 {fan['gap']['p50_ms']}  p99 {fan['gap']['p99_ms']}  "
        f"(n={fan['gap']['n']})"
    )
    print(
        f"  linear, idle:       p50 {pl['gap']['p50_ms']}  p99 {pl['gap']['p99_ms']}  "
        f"(n={pl['gap']['n']})"
    )
    print(
        f"  join,   idle:       p50 {pf['gap']['p50_ms']}  p99 {pf['gap']['p99_ms']}  "
        f"(n={pf['gap']['n']})"
    )
    print()
    print(
        f"commits per step: linear {lin['commits_per_step']} "
        f"(raw {lin['commits_raw']} for {lin['steps']} steps, idle-relay background "
        f"~{lin['commits_background_est']}); fan {fan['commits_per_step']} "
        f"(raw {fan['commits_raw']} for {fan['steps']} steps, background "
        f"~{fan['commits_background_est']})"
    )
    print(
        f"saga steps/s: linear {lin['steps_per_s']}, fan {fan['steps_per_s']}; "
        f"commits/s implied: {round(lin['steps_per_s'] * lin['commits_per_step'])}"
    )
    print(f"single-connection one-row commits/s (this run): {res['pg_one_row_commits_per_s']}")
    if "preloaded" in res:
        pre = res["preloaded"]
        print(
            f"with {pre['runs']:,} finished runs in the tables: linear {pre['linear']['per_s']} "
            f"runs/s ({ratio(pre['linear']['per_s'], lin['per_s'])} of empty), fan "
            f"{pre['fan']['per_s']} runs/s ({ratio(pre['fan']['per_s'], fan['per_s'])} of empty)"
        )
        print("plans of the hot statements, with the tables preloaded:")
        print(pre["explain"])
    if "relay" in res:
        r = res["relay"]
        print(
            f"relay alone: {r['rows_per_s']:,} rows/s to Redis ({r['publish_us_per_row']} us per "
            f"row publishing on its thread; the rest, not overlapped with it, "
            f"{r['db_ms_per_batch']} ms per batch of 200)"
        )
    print(f"reference figures from the issue: {REFERENCE}")


def preloaded(
    saga_side: SagaSide, apps: Any, args: argparse.Namespace, stats: Stats, bg: float
) -> dict[str, Any]:
    """The saga workloads again, with ``args.preload`` finished runs in the tables."""
    from bench.preload import explain, preload

    dsn = PG_DSN + f" dbname={DB_NAME}"
    out: dict[str, Any] = {"runs": args.preload, "load_s": preload(dsn, args.preload, apps.linear)}
    print(f"preloaded {args.preload} finished runs: {out['load_s']}", flush=True)
    out["linear"] = saga_side.workload(apps.linear, args.runs, stats, bg)
    print("saga linear (preloaded):", json.dumps(out["linear"]), flush=True)
    out["fan"] = saga_side.workload(apps.fan, args.fan_runs, stats, bg)
    print("saga fan (preloaded):", json.dumps(out["fan"]), flush=True)
    saga_side.start_runs(apps.linear, 1)  # a ready step for the plans' parameters
    out["explain"] = explain(dsn)
    return out


@contextlib.contextmanager
def profiled(directory: Path | None, name: str, procs: Procs, res: dict[str, Any]) -> Any:
    """With ``directory``, record the worker and the relay with py-spy while the block runs
    and keep the summaries in ``res["profiles"][name]``; else nothing."""
    if directory is None:
        yield
        return
    with contextlib.ExitStack() as stack:
        files = {
            who: stack.enter_context(
                spy.recording(directory, f"{name}-{who}", procs.procs[who].pid)
            )
            for who in ("worker", "relay")
        }
        yield
    found = {who: spy.summary(path) for who, path in files.items()}
    res.setdefault("profiles", {})[name] = found
    for who, doc in found.items():
        print(f"profile {name} {who}: {json.dumps(doc)}", flush=True)


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915 - a linear script
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=2000, help="linear runs / chains")
    ap.add_argument("--fan-runs", type=int, default=200, help="fan-in runs / chords")
    ap.add_argument("--batch", type=int, default=100, help="saga runs started per transaction")
    ap.add_argument("--probe", type=int, default=30, help="runs in each idle-latency probe")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument(
        "--preload",
        type=int,
        default=0,
        metavar="N",
        help="then write N finished runs into the tables, measure saga's two workloads again "
        "and print EXPLAIN of the hot statements",
    )
    ap.add_argument(
        "--relay-rows",
        type=int,
        default=0,
        metavar="N",
        help="also measure the relay alone publishing N outbox rows to a private Redis",
    )
    ap.add_argument(
        "--private-redis",
        type=int,
        metavar="PORT",
        help="start a private redis-server on PORT (no persistence) and use its db 4 "
        "instead of the shared 127.0.0.1:6379, e.g. when other tests restart it",
    )
    ap.add_argument(
        "--py-spy",
        type=Path,
        metavar="DIR",
        help="record the worker (with its pool) and the relay with py-spy during each "
        "workload (raw stacks in DIR) and print where their time went",
    )
    args = ap.parse_args(argv)
    if args.py_spy and not spy.available():
        ap.error('--py-spy needs py-spy: pip install "saga[bench]"')

    global REDIS_URL  # noqa: PLW0603 - the whole script uses the one broker URL
    logdir = Path(tempfile.mkdtemp(prefix="saga-bench-"))
    procs = Procs(logdir)
    if args.private_redis:
        REDIS_URL = f"redis://127.0.0.1:{args.private_redis}/4"
        procs.start(
            "redis",
            [
                "redis-server",
                "--port",
                str(args.private_redis),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
        )
        client = redis.Redis.from_url(REDIS_URL)
        wait_until(lambda: _pings(client), 10, "the private redis-server", procs)
    os.environ["BENCH_REDIS_URL"] = REDIS_URL
    recreate_database()
    redis.Redis.from_url(REDIS_URL).flushdb()
    celery_bin = str(Path(sys.executable).with_name("celery"))
    stats = Stats()
    res: dict[str, Any] = {
        "args": vars(args) | {"json": str(args.json), "py_spy": str(args.py_spy)},
        "redis": REDIS_URL,
        "loadavg_start": os.getloadavg(),
    }
    saga_side: SagaSide | None = None
    try:
        procs.start(
            "relay",
            [
                sys.executable,
                "-c",
                "import logging, sys; logging.basicConfig(level=logging.WARNING); "
                f"import saga.relay; sys.exit(saga.relay.main({APP_SPEC!r}))",
            ],
        )
        procs.start(
            "worker",
            [
                celery_bin,
                "-A",
                APP_SPEC,
                "worker",
                "-P",
                "prefork",
                "-c",
                "2",
                "-Q",
                "saga",
                "--loglevel=WARNING",
                "-n",
                "bench@%h",
            ],
        )
        saga_side = SagaSide(procs, args.batch)
        celery_side = CelerySide(procs)
        apps = saga_side.apps
        print(f"logs in {logdir}; warming up ...", flush=True)
        saga_side.wait_done(saga_side.start_runs(apps.linear, 20), timeout=90)
        saga_side.wait_done(saga_side.start_runs(apps.fan, 5), timeout=60)
        celery_side.workload("chain", 20)
        celery_side.workload("chord", 5)

        bg = background_rate(stats)
        res["idle_relay_commits_per_s"] = round(bg, 2)
        print(f"idle relay background: {bg:.2f} commits/s", flush=True)

        with profiled(args.py_spy, "saga-linear", procs, res):
            res["saga"] = {"linear": saga_side.workload(apps.linear, args.runs, stats, bg)}
        print("saga linear:", json.dumps(res["saga"]["linear"]), flush=True)
        with profiled(args.py_spy, "celery-chain", procs, res):
            res["celery"] = {"chain": celery_side.workload("chain", args.runs)}
        print("celery chain:", json.dumps(res["celery"]["chain"]), flush=True)
        with profiled(args.py_spy, "saga-fan", procs, res):
            res["saga"]["fan"] = saga_side.workload(apps.fan, args.fan_runs, stats, bg)
        print("saga fan:", json.dumps(res["saga"]["fan"]), flush=True)
        with profiled(args.py_spy, "celery-chord", procs, res):
            res["celery"]["chord"] = celery_side.workload("chord", args.fan_runs)
        print("celery chord:", json.dumps(res["celery"]["chord"]), flush=True)

        res["saga"]["probe_linear"] = saga_side.idle_probe(apps.linear, args.probe)
        res["celery"]["probe_chain"] = celery_side.idle_probe("chain", args.probe)
        res["saga"]["probe_fan"] = saga_side.idle_probe(apps.fan, args.probe)
        res["celery"]["probe_chord"] = celery_side.idle_probe("chord", args.probe)
        if args.preload:
            res["preloaded"] = preloaded(saga_side, apps, args, stats, bg)
    finally:
        procs.stop()
        if saga_side is not None:
            saga_side.close()
            saga_side.saga.engine.dispose()
        stats.close()
    res["pg_one_row_commits_per_s"] = round(one_row_commits_per_s())
    if args.relay_rows:
        from bench.relay_throughput import measure

        port = (args.private_redis or 6396) + 1
        res["relay"] = measure(args.relay_rows, 200, port)
        print("relay alone:", json.dumps(res["relay"]), flush=True)
    res["loadavg_end"] = os.getloadavg()
    print_table(res)
    if args.json:
        args.json.write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # Skip interpreter teardown: Celery's Redis result consumer otherwise prints a harmless
    # traceback trying to unsubscribe while modules are being torn down.
    os._exit(code)
