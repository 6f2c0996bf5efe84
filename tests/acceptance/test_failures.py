"""Failure semantics against real processes: Celery workers, a relay (with its sweeper), Redis
and PostgreSQL. Steps and compensations of ``tests.apps.compensating`` record every execution,
so the tests can say what ran, how often, and in which order."""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import create_engine, text

import saga
from saga import InvalidTransitionError, Settings
from tests.apps import compensating
from tests.support import db
from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
APP_MODULE = "tests.apps.compensating"
LEASE_GRACE = 2
REPUBLISH_AFTER = 5
FINISHED = {"completed", "failed", "compensated", "compensation_failed", "cancelled", "resolved"}
RELAY_CODE = (
    "import logging,sys; logging.basicConfig(level=logging.INFO); "
    f"from saga.relay import main; sys.exit(main('{APP_MODULE}:app'))"
)


def private_template() -> Iterator[str]:
    """A migrated template database of this session's own: the shared one is dropped and made
    again by every session, which breaks sessions that run side by side."""
    from saga.db import migrate

    name = db.random_name() + "_tpl"
    db.create_database(name)
    try:
        setup = create_engine(db.sqlalchemy_url(name))
        try:
            migrate.upgrade(setup, schema="saga")
        finally:
            setup.dispose()
        yield name
    finally:
        db.drop_database(name)


db_template = pytest.fixture(scope="session", name="db_template")(private_template)


@dataclass
class Cluster:
    """Workers and a relay of ``tests.apps.compensating`` on a fresh database."""

    supervisor: Supervisor
    engine: saga.Saga
    env: dict[str, str]

    # -- processes ---------------------------------------------------------------------------

    def start_worker(self, name: str, concurrency: int = 2) -> None:
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            APP_MODULE,
            "worker",
            "-Q",
            "saga",
            "-c",
            str(concurrency),
            "--loglevel=INFO",
            "-n",
            f"{name}@%h",
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
        ]
        self.supervisor.start(name, argv, env=self.env, cwd=REPO)

    def start_relay(self) -> None:
        self.supervisor.start("relay", [sys.executable, "-c", RELAY_CODE], env=self.env, cwd=REPO)

    def wait_ready(self, name: str, times: int = 1, timeout: float = 60) -> None:
        """Wait until worker ``name`` has said it is ready ``times`` times (once per start)."""
        wait_until(
            lambda: self.supervisor.log(name).count(" ready.") >= times,
            timeout=timeout,
            interval=0.1,
            message=f"worker {name} did not become ready",
        )

    # -- runs --------------------------------------------------------------------------------

    def start(self, workflow: str, input: Any = None) -> str:
        return self.engine.start_now(workflow, input or {}).run_id

    def run(self, run_id: str) -> dict[str, Any]:
        return self.engine.get_run(run_id)

    def state(self, run_id: str) -> str:
        return str(self.run(run_id)["state"])

    def wait_state(self, run_id: str, timeout: float = 40) -> str:
        """Wait until the run has finished (or waits for an operator); its state."""

        def finished() -> str:
            state = self.state(run_id)
            assert state in FINISHED, f"still {state}"
            return state

        return wait_until(finished, timeout=timeout, interval=0.1, message="the run did not end")

    def executions(self, run_id: str, **where: str) -> list[dict[str, Any]]:
        """The run's recorded executions (``kind``/``step``/``note`` filters), oldest first."""
        sql = "SELECT * FROM executions WHERE run_id = :run_id"
        for column in where:
            sql += f" AND {column} = :{column}"
        with self.engine.engine.connect() as conn:
            rows = conn.execute(text(sql + " ORDER BY id"), {"run_id": run_id, **where})
            return [dict(r) for r in rows.mappings()]

    def sql(self, statement: str, **params: Any) -> list[Any]:
        with self.engine.engine.begin() as conn:
            result = conn.execute(text(statement), params)
            return list(result.all()) if result.returns_rows else []


def flush_broker(url: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        client.flushdb()
    finally:
        client.close()


@pytest.fixture
def cluster(db_url: str, redis_url: str, supervisor: Supervisor) -> Iterator[Cluster]:
    """A fresh database with ``executions`` and ``control`` tables, an empty broker (the tests'
    own Redis database), and an engine for the test; start workers and the relay with
    :func:`running`."""
    setup = create_engine(db_url)
    try:
        with setup.begin() as conn:
            conn.execute(text(compensating.EXECUTIONS_DDL))
            conn.execute(text(compensating.CONTROL_DDL))
    finally:
        setup.dispose()
    env = {
        "SAGA_DATABASE_URL": db_url,
        "SAGA_BROKER_URL": redis_url,
        "SAGA_LEASE_GRACE": str(LEASE_GRACE),
        "SAGA_REPUBLISH_AFTER": str(REPUBLISH_AFTER),
        "PYTHONUNBUFFERED": "1",
    }
    settings = Settings(lease_grace=LEASE_GRACE, republish_after=REPUBLISH_AFTER)
    engine = saga.Saga(compensating.registry, database_url=db_url, settings=settings)
    try:
        yield Cluster(supervisor, engine, env)
    finally:
        supervisor.stop_all()
        engine.engine.dispose()
        flush_broker(redis_url)


def running(cluster: Cluster, workers: int = 2) -> Cluster:
    """Start ``workers`` workers (two processes each) and the relay."""
    names = [f"worker{i}" for i in range(workers)]
    for name in names:
        cluster.start_worker(name)
    cluster.start_relay()
    for name in names:
        cluster.wait_ready(name)
    return cluster


def events(run: dict[str, Any], event: str, kind: str | None = None) -> list[dict[str, Any]]:
    """The run's history entries of one event (and kind)."""
    return [
        h for h in run["history"] if h["event"] == event and (kind is None or h["kind"] == kind)
    ]


def history_id(run: dict[str, Any], event: str, kind: str, step: str) -> int:
    """The id of the one history entry of ``event`` for ``kind``/``step``."""
    found = [h["id"] for h in events(run, event, kind) if h["step"] == step]
    assert len(found) == 1, f"{event} {kind} {step}: {found}"
    return int(found[0])


def steps_of(run: dict[str, Any], kind: str = "step") -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in run["steps"] if s["kind"] == kind}


def names(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [r["step"] for r in rows]


# -- 1. compensation order -------------------------------------------------------------------


def test_a_diamond_whose_last_step_fails_undoes_it_then_both_branches_then_the_first_step(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start(
        "comp.diamond", {"fail": {"d": "permanent"}, "comp_sleep": {"b": 0.5, "c": 0.5}}
    )
    assert cluster.wait_state(run_id) == "compensated"

    run = cluster.run(run_id)
    assert run["error"]["step"] == "d"
    assert {s: r["state"] for s, r in steps_of(run).items()} == {
        "a": "completed",
        "b": "completed",
        "c": "completed",
        "d": "failed",
    }
    # Every step that started is undone, the failed one too (its code may have had part of
    # its effect), each exactly once.
    assert {s: r["state"] for s, r in steps_of(run, "compensation").items()} == {
        "a": "completed",
        "b": "completed",
        "c": "completed",
        "d": "completed",
    }
    starts = cluster.executions(run_id, kind="compensation", note="start")
    ends = {r["step"]: r for r in cluster.executions(run_id, kind="compensation", note="end")}
    assert sorted(names(starts)) == ["a", "b", "c", "d"]
    assert sorted(ends) == ["a", "b", "c", "d"]
    assert [r["step"] for r in cluster.executions(run_id, kind="step")].count("d") == 1
    # d's compensation came first, a's only after b's and c's had finished: in the
    # executions ...
    first_start = {r["step"]: r for r in reversed(starts)}
    for branch in ("b", "c"):
        assert first_start[branch]["id"] > ends["d"]["id"]
    assert first_start["a"]["id"] > ends["b"]["id"] and first_start["a"]["id"] > ends["c"]["id"]
    assert first_start["a"]["at"] >= max(ends["b"]["at"], ends["c"]["at"])
    # ... and in the history.
    a_started = history_id(run, "step_started", "compensation", "a")
    for branch in ("b", "c"):
        assert history_id(run, "step_completed", "compensation", branch) < a_started
        assert history_id(run, "step_completed", "compensation", "d") < history_id(
            run, "step_started", "compensation", branch
        )
    assert history_id(run, "step_failed", "step", "d") < history_id(
        run, "step_started", "compensation", "d"
    )
    assert events(run, "run_compensated")[-1]["id"] == run["history"][-1]["id"]


# -- 2. retries ------------------------------------------------------------------------------


def test_a_step_that_fails_twice_then_succeeds_completes_the_run_on_its_third_attempt(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start("comp.linear", {"fail": {"second": 2}})
    assert cluster.wait_state(run_id) == "completed"

    second = cluster.executions(run_id, kind="step", step="second")
    assert [r["attempt"] for r in second] == [1, 2, 3]
    assert len({r["idempotency_key"] for r in second}) == 1
    assert names(cluster.executions(run_id, kind="step")).count("first") == 1
    assert cluster.executions(run_id, kind="compensation") == []
    run = cluster.run(run_id)
    assert len(events(run, "step_retry_scheduled", "step")) == 2
    assert run["result"] == {"third": {"step": "third", "attempt": 1}}


def test_a_step_whose_retries_run_out_fails_and_the_run_is_compensated(cluster: Cluster) -> None:
    running(cluster)
    run_id = cluster.start("comp.linear", {"fail": {"second": "always"}})
    assert cluster.wait_state(run_id) == "compensated"

    second = cluster.executions(run_id, kind="step", step="second")
    assert [r["attempt"] for r in second] == [1, 2, 3]
    assert len({r["idempotency_key"] for r in second}) == 1
    run = cluster.run(run_id)
    steps = steps_of(run)
    assert (steps["first"]["state"], steps["second"]["state"], steps["third"]["state"]) == (
        "completed",
        "failed",
        "skipped",
    )
    assert "attempt 3" in steps["second"]["error"]["message"]
    assert run["error"]["step"] == "second"
    # The failed step is undone too (a failed attempt may have had its effect), then first.
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == [
        "second", "first",
    ]
    assert cluster.executions(run_id, step="third") == []


# -- 3. failing compensations ----------------------------------------------------------------


def test_a_compensation_that_fails_twice_then_succeeds_still_compensates_the_run(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start(
        "comp.linear", {"fail": {"third": "permanent"}, "comp_fail": {"second": 2}}
    )
    assert cluster.wait_state(run_id) == "compensated"

    undo_second = cluster.executions(run_id, kind="compensation", step="second", note="start")
    assert [r["attempt"] for r in undo_second] == [1, 2, 3]
    assert len({r["idempotency_key"] for r in undo_second}) == 1
    ends = cluster.executions(run_id, kind="compensation", note="end")
    assert names(ends) == ["third", "second", "first"]
    assert len(cluster.executions(run_id, kind="compensation", step="first")) == 2  # start, end


def test_a_compensation_failing_for_good_waits_for_an_operator_whose_retry_compensates_the_run(
    cluster: Cluster,
) -> None:
    running(cluster)
    cluster.sql("INSERT INTO control (key) VALUES ('comp_fail:second')")
    run_id = cluster.start(
        "comp.linear", {"fail": {"third": "permanent"}, "comp_fail": {"second": "control"}}
    )
    assert cluster.wait_state(run_id) == "compensation_failed"

    run = cluster.run(run_id)
    assert run["finished_at"] is None
    assert run["error"]["step"] == "second" and run["error"]["kind"] == "compensation"
    assert "declined" in run["error"]["message"]
    comps = steps_of(run, "compensation")
    assert comps["second"]["state"] == "failed"
    assert "declined" in comps["second"]["error"]["message"]
    assert comps["first"]["state"] == "waiting"  # first is undone only after second
    assert cluster.executions(run_id, kind="compensation", step="first") == []

    cluster.sql("DELETE FROM control WHERE key = 'comp_fail:second'")
    assert cluster.engine.retry(run_id) == "compensating"
    assert cluster.wait_state(run_id) == "compensated"

    undo_second = cluster.executions(run_id, kind="compensation", step="second", note="start")
    assert len(undo_second) == 2
    assert len({r["idempotency_key"] for r in undo_second}) == 1
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == [
        "third", "second", "first",
    ]
    assert len(events(cluster.run(run_id), "operator_retry")) == 1


def test_an_operator_can_resolve_a_run_whose_compensation_failed_keeping_the_reason(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start(
        "comp.linear", {"fail": {"third": "permanent"}, "comp_fail": {"second": "permanent"}}
    )
    assert cluster.wait_state(run_id) == "compensation_failed"

    assert cluster.engine.resolve(run_id, "refunded by hand, ticket 42") == "resolved"
    run = cluster.run(run_id)
    assert run["state"] == "resolved" and run["finished_at"] is not None
    resolved = events(run, "operator_resolved")
    assert [h["detail"] for h in resolved] == [{"reason": "refunded by hand, ticket 42"}]
    assert run["error"]["step"] == "second"  # the failure is kept
    with pytest.raises(InvalidTransitionError):
        cluster.engine.resolve(run_id, "again")
    with pytest.raises(InvalidTransitionError):
        cluster.engine.retry(run_id)


# -- 4. time limits --------------------------------------------------------------------------


def test_a_step_overrunning_its_time_limit_fails_each_attempt_and_the_run_compensates(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start("comp.overrun", {"sleep": {"overrun": 5}})
    assert cluster.wait_state(run_id, timeout=60) == "compensated"

    overruns = cluster.executions(run_id, kind="step", step="overrun")
    assert [r["attempt"] for r in overruns] == [1, 2]  # TWICE: two attempts
    run = cluster.run(run_id)
    error = steps_of(run)["overrun"]["error"]
    # saga times the step's code itself (not Celery's soft limit, which could fire inside the
    # engine's own database calls).
    assert error["type"] == "saga.timeouts.StepTimeoutError", error
    assert "ran past its time limit of 1s" in error["message"]
    assert steps_of(run)["overrun"]["state"] == "failed"
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == ["before"]


# -- 5. cancelling ---------------------------------------------------------------------------


def test_cancelling_a_run_mid_flight_lets_the_running_step_finish_and_undoes_what_completed(
    cluster: Cluster,
) -> None:
    running(cluster)
    run_id = cluster.start("comp.linear", {"sleep": {"second": 2}})
    wait_until(
        lambda: cluster.executions(run_id, kind="step", step="second"),
        timeout=30,
        message="the slow step did not start",
    )
    assert cluster.engine.cancel(run_id, "customer changed their mind") == "cancelling"
    assert cluster.wait_state(run_id) == "cancelled"

    run = cluster.run(run_id)
    steps = steps_of(run)
    # The running step finished; nothing new started.
    assert (steps["first"]["state"], steps["second"]["state"], steps["third"]["state"]) == (
        "completed",
        "completed",
        "skipped",
    )
    assert cluster.executions(run_id, step="third") == []
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == ["second", "first"]
    assert run["error"]["message"] == "customer changed their mind"
    assert history_id(run, "step_completed", "step", "second") < history_id(
        run, "step_started", "compensation", "second"
    )


def test_cancelling_a_finished_run_is_refused(cluster: Cluster) -> None:
    running(cluster, workers=1)
    run_id = cluster.start("comp.linear")
    assert cluster.wait_state(run_id) == "completed"
    with pytest.raises(InvalidTransitionError):
        cluster.engine.cancel(run_id)
    assert cluster.state(run_id) == "completed"
    assert cluster.executions(run_id, kind="compensation") == []


# -- 6. workers killed -----------------------------------------------------------------------


def test_a_worker_killed_during_a_retry_backoff_does_not_lose_the_retry(cluster: Cluster) -> None:
    running(cluster, workers=1)
    run_id = cluster.start("comp.backoff", {"fail": {"charge": 1}})

    def retry_published_and_waiting() -> bool:
        rows = cluster.sql(
            "SELECT 1 FROM saga.outbox o JOIN saga.step_runs s USING (run_id, kind, step, attempt) "
            "WHERE o.run_id = :r AND o.step = 'charge' AND o.attempt = 2 "
            "AND o.published_at IS NOT NULL AND s.state = 'ready' "
            "AND s.due_at > now() + interval '0.5 seconds'",
            r=run_id,
        )
        return bool(rows)

    # The retry is on the broker, held by the worker until it is due: kill the worker then.
    wait_until(
        retry_published_and_waiting,
        timeout=30,
        interval=0.02,
        message="the retry was not published during its backoff",
    )
    cluster.supervisor.kill("worker0", signal.SIGKILL)
    cluster.wait_ready("worker0", times=2)  # the supervisor restarted it

    assert cluster.wait_state(run_id, timeout=60) == "completed"
    charge = cluster.executions(run_id, kind="step", step="charge")
    assert [r["attempt"] for r in charge][:2] == [1, 2]
    assert len(charge) in (2, 3)  # a retry killed mid-run would be tried once more
    assert len({r["idempotency_key"] for r in charge}) == 1
    assert len(cluster.executions(run_id, kind="step", step="reserve")) == 1
    assert cluster.executions(run_id, kind="compensation") == []


def test_a_worker_killed_during_a_compensation_still_ends_compensated_undoing_each_step_once(
    cluster: Cluster,
) -> None:
    running(cluster, workers=1)
    run_id = cluster.start(
        "comp.linear", {"fail": {"third": "permanent"}, "comp_sleep_first": {"second": 4}}
    )
    wait_until(
        lambda: cluster.executions(run_id, kind="compensation", step="second"),
        timeout=30,
        message="the compensation did not start",
    )
    cluster.supervisor.kill("worker0", signal.SIGKILL)
    assert cluster.wait_state(run_id, timeout=60) == "compensated"

    undo_second = cluster.executions(run_id, kind="compensation", step="second", note="start")
    assert [r["attempt"] for r in undo_second] == [1, 2]
    assert len({r["idempotency_key"] for r in undo_second}) == 1
    # Completed compensations are recorded once; the killed one completed once, on its retry.
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == [
        "third", "second", "first",
    ]
    assert len(cluster.executions(run_id, kind="compensation", step="first", note="start")) == 1
    assert [
        names(cluster.executions(run_id, kind="step")).count(s) for s in ("first", "second")
    ] == [1, 1]
    run = cluster.run(run_id)
    assert [h["step"] for h in events(run, "lease_expired", "compensation")] == ["second"]


# -- 7. deadlines ----------------------------------------------------------------------------


def test_a_run_past_its_deadline_stops_and_is_compensated(cluster: Cluster) -> None:
    running(cluster)
    run_id = cluster.start("comp.deadline", {"sleep": {"hold": 4}})
    assert cluster.wait_state(run_id) == "compensated"

    run = cluster.run(run_id)
    assert run["error"]["type"] == "saga.DeadlineExceeded"
    assert len(events(run, "deadline_exceeded")) == 1
    steps = steps_of(run)
    assert (steps["book"]["state"], steps["hold"]["state"], steps["finish"]["state"]) == (
        "completed",
        "completed",
        "skipped",
    )
    assert cluster.executions(run_id, step="finish") == []
    assert names(cluster.executions(run_id, kind="compensation", note="end")) == ["hold", "book"]
