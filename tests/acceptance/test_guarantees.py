"""The guarantees under faults, against real ``celery worker`` and relay processes: leases that
live with their worker, compensation of steps whose outcome is unknown, deploys that change
policies or versions under running runs, a lost reply to a committed completion, and a threads
pool sharing the engine's connection pool with the steps' own code."""

from __future__ import annotations

from collections import Counter
from typing import Any

import pytest
from sqlalchemy import text

from saga import Workflow
from tests.acceptance.conftest import System
from tests.apps import guarantees
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

HEARTBEAT = "3"
"""The processes' heartbeat timeout, seconds: a dead worker's step runs again this soon."""


@pytest.fixture
def system_app() -> tuple[str, Any]:
    """The guarantees app, with both versions of ``g.deploy`` in the test process."""

    def workflows_of(queue: str) -> list[Workflow]:
        return guarantees.workflows(queue, "1,2")

    return "tests.apps.guarantees:app", workflows_of


@pytest.fixture
def gsys(system: System) -> System:
    """The system, with short heartbeats for every process it starts."""
    system.env["SAGA_HEARTBEAT_TIMEOUT"] = HEARTBEAT
    return system


def executions(system: System, run_id: str, **where: Any) -> list[dict[str, Any]]:
    """The run's recorded executions (filtered by column), oldest first."""
    sql = "SELECT * FROM executions WHERE run_id = :run_id"
    for column in where:
        sql += f" AND {column} = :{column}"
    with system.engine.engine.connect() as conn:
        rows = conn.execute(text(sql + " ORDER BY id"), {"run_id": run_id, **where})
        return [dict(r) for r in rows.mappings()]


def started(system: System, run_id: str, step: str, attempt: int = 1) -> bool:
    """Whether ``step``'s attempt has begun running its code."""
    return bool(executions(system, run_id, kind="step", step=step, attempt=attempt, note="start"))


def wait_state(system: System, run_id: str, timeout: float = 60) -> str:
    """Wait until the run has finished; its state."""
    return system.wait_finished([run_id], timeout=timeout)[run_id]


def payments(system: System) -> str:
    """The payments queue of this test's system."""
    return guarantees.payments_queue(system.queue)


# -- leases that live with their worker -------------------------------------------------------


def test_a_step_overrunning_on_a_threads_pool_worker_is_stopped_and_never_runs_twice_at_once(
    gsys: System,
) -> None:
    gsys.start_worker("worker", concurrency=4, pool="threads")
    gsys.start_relay()
    run_id = gsys.start_runs("g.spin", {"sleep": {"spin": 12}})[0]

    assert wait_state(gsys, run_id) == "failed"
    rows = executions(gsys, run_id, kind="step", step="spin")
    assert [(r["attempt"], r["note"]) for r in rows] == [
        (1, "start"), (1, "stop"), (2, "start"), (2, "stop"),
    ]
    # The second attempt began only after the first had stopped: never two at once.
    assert rows[2]["at"] > rows[1]["at"]
    # Both stopped at their time limit, well before their twelve seconds of work.
    for begin, end in ((rows[0], rows[1]), (rows[2], rows[3])):
        assert (end["at"] - begin["at"]).total_seconds() < 8
    error = gsys.run(run_id)["error"]
    assert "time limit" in error["message"], error


def test_a_worker_killed_mid_step_has_its_step_run_again_after_the_heartbeat_timeout(
    gsys: System,
) -> None:
    gsys.start_worker("worker")
    gsys.start_relay()
    run_id = gsys.start_runs("g.hold", {"sleep": {"hold": 4}})[0]
    wait_until(lambda: started(gsys, run_id, "hold"), message="the step did not start")

    gsys.supervisor.kill("worker")
    # The step's time limit is two minutes: only its stopped heartbeat can bring it back.
    wait_until(
        lambda: started(gsys, run_id, "hold", attempt=2),
        timeout=40,
        message="the step did not run again after its worker died",
    )
    assert wait_state(gsys, run_id) == "completed"
    history = [h["event"] for h in gsys.run(run_id)["history"]]
    assert "lease_expired" in history


def test_a_message_whose_worker_died_before_claiming_it_goes_to_another_worker_at_once(
    gsys: System,
) -> None:
    # Acknowledged with its dead worker, the message would wait two minutes to go out again.
    gsys.env["SAGA_REPUBLISH_AFTER"] = "120"
    # This worker's pool processes die (SIGKILL) on every message for `first`, before claiming.
    gsys.start_worker("doomed", env={"SAGA_FAULTS": "executor.kill:before_claim:first"})
    gsys.start_relay()
    [run_id] = gsys.start_runs("g.policy", {})
    wait_until(
        lambda: "WorkerLostError" in gsys.supervisor.log("doomed"),
        timeout=30,
        message="the doomed worker's pool process did not die with the message",
    )
    gsys.supervisor.stop("doomed")

    gsys.start_worker("healthy")
    assert wait_state(gsys, run_id, timeout=30) == "completed"
    assert [r["step"] for r in executions(gsys, run_id, note="end")] == ["first", "second"]
    [first] = [s for s in gsys.run(run_id)["steps"] if s["step"] == "first"]
    assert first["attempt"] == 1  # the same attempt, handed back: not a retry


def test_a_live_step_longer_than_the_heartbeat_timeout_runs_once(gsys: System) -> None:
    gsys.start_worker("worker")
    gsys.start_relay()
    run_id = gsys.start_runs("g.hold", {"sleep": {"hold": 10}})[0]

    assert wait_state(gsys, run_id) == "completed"
    rows = executions(gsys, run_id, kind="step", step="hold")
    assert [(r["attempt"], r["note"]) for r in rows] == [(1, "start"), (1, "end")]


# -- compensating what may have happened -------------------------------------------------------


def compensations(system: System, run_id: str) -> list[dict[str, Any]]:
    """The run's compensation executions, oldest first."""
    return executions(system, run_id, kind="compensation")


def test_a_charge_whose_worker_died_while_the_other_branch_failed_is_refunded_once(
    gsys: System,
) -> None:
    gsys.start_worker("worker")
    gsys.start_worker("payments", queues=[payments(gsys)])
    gsys.start_relay()
    knobs = {
        "sleep": {"charge": 30},
        "fail": {"check": "permanent"},
        "after_started": {"check": "charge"},
    }
    run_id = gsys.start_runs("g.checkout", knobs)[0]
    wait_until(lambda: started(gsys, run_id, "charge"), message="the charge did not start")

    gsys.supervisor.kill("payments")  # the supervisor starts it again

    assert wait_state(gsys, run_id) == "compensated"
    undone = [(r["step"], r["outcome"]) for r in compensations(gsys, run_id)]
    # The charge's outcome is unknown: it is refunded, exactly once, before the reservation.
    assert undone == [("charge", "unknown"), ("reserve", "completed")]
    assert len(executions(gsys, run_id, kind="step", step="charge")) == 1


def test_a_charge_still_running_when_the_other_branch_fails_is_refunded_after_it_ends(
    gsys: System,
) -> None:
    gsys.start_worker("worker")
    gsys.start_worker("payments", queues=[payments(gsys)])
    gsys.start_relay()
    knobs = {
        "sleep": {"charge": 5},
        "fail": {"check": "permanent"},
        "after_started": {"check": "charge"},
    }
    run_id = gsys.start_runs("g.checkout", knobs)[0]

    assert wait_state(gsys, run_id) == "compensated"
    charge = executions(gsys, run_id, kind="step", step="charge")
    assert [r["note"] for r in charge] == ["start", "end"]
    undone = compensations(gsys, run_id)
    assert [(r["step"], r["outcome"]) for r in undone] == [
        ("charge", "completed"), ("reserve", "completed"),
    ]
    assert undone[0]["at"] > charge[-1]["at"]


def test_a_timed_out_charge_is_refunded(gsys: System) -> None:
    gsys.start_worker("worker")
    gsys.start_worker("payments", queues=[payments(gsys)])
    gsys.start_relay()
    # The charge's time limit is one second: it has made its call, then runs over.
    run_id = gsys.start_runs("g.checkout_tight", {"sleep": {"charge": 4}})[0]

    assert wait_state(gsys, run_id) == "compensated"
    undone = [(r["step"], r["outcome"]) for r in compensations(gsys, run_id)]
    assert undone == [("charge", "unknown"), ("reserve", "completed")]


# -- deploys -------------------------------------------------------------------------------------


def test_a_retry_policy_raised_under_a_running_run_applies_and_the_run_completes(
    gsys: System,
) -> None:
    # The run starts under three attempts; the worker has been deployed with five.
    gsys.start_worker("worker", env={"SAGA_TEST_MAX_ATTEMPTS": "5"})
    gsys.start_relay()
    run_id = gsys.start_runs("g.policy", {"fail": {"second": 3}})[0]

    assert wait_state(gsys, run_id) == "completed"
    attempts = [r["attempt"] for r in executions(gsys, run_id, step="second", note="start")]
    assert attempts == [1, 2, 3, 4]


def start_deploy_runs(system: System, version: int, count: int) -> list[str]:
    """Start ``count`` runs of ``g.deploy`` at ``version``."""
    with system.engine.engine.begin() as conn:
        return [
            system.engine.start(conn, "g.deploy", {"sleep": {"a": 0.2, "b": 0.2}}, version=version)
            .run_id
            for _ in range(count)
        ]


def test_a_rolling_deploy_from_version_1_to_2_fails_and_drops_nothing(gsys: System) -> None:
    # A message a worker drops waits two minutes to go out again: the test would time out.
    gsys.env["SAGA_REPUBLISH_AFTER"] = "120"
    old = {"SAGA_TEST_DEPLOY_VERSIONS": "1"}
    new = {"SAGA_TEST_DEPLOY_VERSIONS": "1,2"}
    gsys.start_worker("w1", env=old)
    gsys.start_worker("w2", env=old)
    gsys.start_relay("relay1", env=old)

    v1 = start_deploy_runs(gsys, 1, 10)
    v2 = start_deploy_runs(gsys, 2, 10)  # the web tier is deployed first
    wait_until(lambda: gsys.execution_count() > 0, message="nothing started")

    # Workers are replaced one by one (warm shutdown: running steps finish).
    gsys.supervisor.stop("w1", timeout=30)
    gsys.start_worker("w1new", env=new)
    v2 += start_deploy_runs(gsys, 2, 10)
    gsys.supervisor.stop("relay1", timeout=30)
    gsys.start_relay("relay2", env=new)
    gsys.supervisor.stop("w2", timeout=30)
    gsys.start_worker("w2new", env=new)
    v1 += start_deploy_runs(gsys, 1, 5)

    states = gsys.wait_finished(v1 + v2, timeout=90)
    assert Counter(states.values()) == Counter(completed=len(v1) + len(v2))
    for run_id in v1:
        assert gsys.run(run_id)["version"] == 1
        assert {r["step"] for r in executions(gsys, run_id, note="end")} == {"a", "b"}
    for run_id in v2:
        assert gsys.run(run_id)["version"] == 2
        assert {r["step"] for r in executions(gsys, run_id, note="end")} == {"a", "b", "c"}
    # An old worker that met a version-2 message said so once for it, not once per try.
    lines = [
        line
        for name in ("w1", "w2")
        for line in gsys.supervisor.log(name).splitlines()
        if "no worker here has its definition" in line
    ]
    assert len(lines) == len(set(lines))


# -- recovery ------------------------------------------------------------------------------------


def test_a_lost_reply_to_a_committed_completion_still_starts_the_next_step_at_once(
    gsys: System,
) -> None:
    # Without the replay, the next step's message would wait two minutes for the sweeper.
    gsys.env["SAGA_REPUBLISH_AFTER"] = "120"
    gsys.start_worker("worker", env={"SAGA_FAULTS": "hot_path.reply_lost:complete"})
    gsys.start_relay()
    run_id = gsys.start_runs("g.policy", {})[0]

    assert wait_state(gsys, run_id, timeout=30) == "completed"
    assert "fault point hot_path.reply_lost" in gsys.supervisor.log("worker")
    steps = [(r["step"], r["note"]) for r in executions(gsys, run_id)]
    assert steps == [("first", "start"), ("first", "end"), ("second", "start"), ("second", "end")]


def test_a_threads_pool_of_ten_on_the_default_connection_pool_ends_every_run_as_designed(
    gsys: System,
) -> None:
    gsys.start_worker("worker", concurrency=10, pool="threads")
    gsys.start_relay()
    plain = gsys.start_runs("g.mixed", {"sleep": {"b": 0.1, "c": 0.1}}, 40)
    flaky = gsys.start_runs("g.mixed", {"fail": {"c": 1}, "sleep": {"b": 0.1}}, 30)
    failing = gsys.start_runs("g.mixed", {"fail": {"d": "permanent"}, "sleep": {"c": 0.1}}, 30)

    states = gsys.wait_finished(plain + flaky + failing, timeout=120)
    assert Counter(states[r] for r in plain + flaky) == Counter(completed=70)
    assert Counter(states[r] for r in failing) == Counter(compensated=30)
    for run_id in failing:
        # d failed for good (it may have had an effect): all four are undone, d first.
        undone = [r["step"] for r in compensations(gsys, run_id)]
        assert undone[0] == "d" and undone[-1] == "a" and sorted(undone) == ["a", "b", "c", "d"]
    assert "TimeoutError" not in gsys.supervisor.log("worker")


def test_a_worker_killed_in_a_step_it_chained_in_process_has_that_step_run_again(
    gsys: System,
) -> None:
    gsys.start_worker("worker")
    gsys.start_relay()
    run_id = gsys.start_runs("g.policy", {"sleep": {"second": 30}})[0]
    wait_until(lambda: started(gsys, run_id, "second"), message="second did not start")
    # One message went to the worker: second was claimed with first's completion, in-process.
    assert gsys.supervisor.log("worker").count("] received") == 1
    steps = {s["step"]: s for s in gsys.run(run_id)["steps"]}
    assert steps["first"]["worker"].rsplit(":", 1)[0] == steps["second"]["worker"].rsplit(":", 1)[0]

    gsys.supervisor.kill("worker")  # the chained step's lease is all that is left of it
    wait_until(
        lambda: started(gsys, run_id, "second", attempt=2),
        timeout=40,
        message="the chained step did not run again after its worker died",
    )
    history = [h["event"] for h in gsys.run(run_id)["history"]]
    assert "lease_expired" in history


@pytest.mark.parametrize("moment", ["before_commit", "after_commit"])
def test_a_transactional_step_killed_around_its_commit_writes_exactly_once(
    gsys: System, moment: str
) -> None:
    with gsys.engine.engine.begin() as conn:
        conn.execute(text("CREATE TABLE ledger (run_id uuid, attempt int)"))
    # Each first attempt's worker process kills itself just before, or just after, the commit.
    gsys.start_worker("worker", env={"SAGA_FAULTS": f"transactional.kill:{moment}:attempt1"})
    gsys.start_relay()
    run_ids = gsys.start_runs("g.ledger", {}, 3)

    states = gsys.wait_finished(run_ids, timeout=90)
    assert Counter(states.values()) == Counter(completed=3)
    with gsys.engine.engine.connect() as conn:
        rows = conn.execute(text("SELECT run_id::text, attempt FROM ledger")).all()
    assert sorted(r[0] for r in rows) == sorted(run_ids), "one row per run, exactly"
    # Before the commit the attempt left nothing and ran again; after it, it was done.
    assert {r[1] for r in rows} == ({2} if moment == "before_commit" else {1})
    assert gsys.supervisor.log("worker").count(f"fault point transactional.kill:{moment}") >= 3
