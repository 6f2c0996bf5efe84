"""Executing workflows on a real system: Celery workers and a relay as processes, a real broker
(Redis or RabbitMQ) and PostgreSQL, with crashes and outages along the way."""

from __future__ import annotations

import signal
from collections import Counter

import pytest

from tests.acceptance.conftest import RedisServer, System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

LINEAR_STEPS = ("first", "second", "third")
FAN_STEPS = ("split", *(f"branch_{i}" for i in range(10)), "join")


def step_counts(system: System, run_ids: list[str]) -> dict[str, Counter[str]]:
    """How many times each step's code ran, per run."""
    counts: dict[str, Counter[str]] = {r: Counter() for r in run_ids}
    for e in system.executions(run_ids):
        counts[e["run_id"]][e["step"]] += 1
    return counts


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_a_linear_workflow_and_a_ten_way_fan_out_complete_running_each_step_once(
    system: System,
) -> None:
    system.start_worker()
    system.start_relay()

    [linear] = system.start_runs("test.linear", {"order": 1})
    [fan] = system.start_runs("test.fan", {"order": 2})
    system.wait_finished([linear, fan], timeout=60)

    linear_run = system.run(linear)
    assert linear_run["state"] == "completed"
    assert linear_run["result"] == {"third": {"step": "third", "attempt": 1}}
    fan_run = system.run(fan)
    assert fan_run["state"] == "completed"
    assert fan_run["result"] == {"join": {"step": "join", "attempt": 1}}

    counts = step_counts(system, [linear, fan])
    assert counts[linear] == Counter(dict.fromkeys(LINEAR_STEPS, 1))
    assert counts[fan] == Counter(dict.fromkeys(FAN_STEPS, 1))


def test_an_existing_celery_task_runs_as_a_step_on_a_worker_that_has_it(system: System) -> None:
    system.start_worker()
    system.start_relay()

    [run_id] = system.start_runs("test.legacy", {"prices": [1200, 350, 99]})
    system.wait_finished([run_id], timeout=60)

    run = system.run(run_id)
    assert run["state"] == "completed"
    assert run["result"] == {"total": 1649}


def test_a_step_whose_worker_is_killed_mid_run_runs_again_and_the_run_completes(
    system: System,
) -> None:
    system.start_worker()
    system.start_relay()
    first_pid = system.supervisor.pid("worker")

    [run_id] = system.start_runs("test.linear_quick", {"sleep": {"second": 2}})
    wait_until(
        lambda: any(e["step"] == "second" for e in system.executions([run_id])),
        timeout=30,
        message="step 'second' never started",
    )
    system.supervisor.kill("worker", signal.SIGKILL)

    # The supervisor starts a new worker; the sweeper expires the dead attempt's lease and the
    # retry policy schedules the step again.
    wait_until(
        lambda: system.supervisor.restarts("worker") >= 1,
        timeout=30,
        message="the worker was not restarted",
    )
    system.wait_ready("worker", times=2)
    assert system.supervisor.pid("worker") != first_pid
    states = system.wait_finished([run_id], timeout=60)
    assert states[run_id] == "completed"

    seconds = [e for e in system.executions([run_id]) if e["step"] == "second"]
    assert len(seconds) == 2, seconds
    assert seconds[0]["attempt"] < seconds[1]["attempt"]
    assert seconds[0]["idempotency_key"] == seconds[1]["idempotency_key"]
    assert step_counts(system, [run_id])[run_id] == Counter(first=1, second=2, third=1)
    history = [h["event"] for h in system.run(run_id)["history"]]
    assert "lease_expired" in history


def test_fan_out_runs_all_complete_through_a_redis_restart_that_loses_every_message(
    system: System, redis_server: RedisServer
) -> None:
    workers = ("worker_a", "worker_b")
    for name in workers:
        system.start_worker(name)
    system.start_relay()
    run_ids = system.start_runs("test.fan_quick", {}, 100)
    total = 100 * len(FAN_STEPS)

    wait_until(
        lambda: system.execution_count() >= total // 4,
        timeout=60,
        message="the runs did not get going",
    )
    system.broker_outage(redis_server, workers)
    # Redis is back, empty: whatever was queued or unacknowledged is gone. The sweeper
    # republishes what never started and expires the leases of what was cut off.
    assert system.execution_count() < total, "the outage came too late to matter"

    states = system.wait_finished(run_ids, timeout=150)
    assert Counter(states.values()) == Counter(completed=len(run_ids))
    counts = step_counts(system, run_ids)
    # Every step ran, the join too; a step runs again only as a new attempt after the outage
    # cut its attempt off (the worker cancels what runs when it loses the broker, and a chained
    # join runs while the outage can hit it), never twice under one attempt.
    assert all(set(c) == set(FAN_STEPS) for c in counts.values())
    attempts = Counter((e["run_id"], e["step"], e["attempt"]) for e in system.executions(run_ids))
    assert max(attempts.values()) == 1, [a for a, n in attempts.items() if n > 1]
    for run_id in {r for (r, step, attempt) in attempts if step == "join" and attempt > 1}:
        expired = [
            h
            for h in system.run(run_id)["history"]
            if h["event"] == "lease_expired" and h["step"] == "join"
        ]
        assert expired, f"run {run_id} ran its join again without losing the first attempt"
    # Messages were lost with Redis, and the sweeper published them again.
    assert system.history_count("message_republished") > 0


def test_killing_the_relay_mid_batch_loses_no_message(system: System) -> None:
    system.start_worker()
    run_ids = system.start_runs("test.linear", {}, 150)

    # Small batches, so that the kill most likely lands inside one (its transaction rolls back
    # and the next relay publishes those messages again).
    system.start_relay(batch_size=10)
    wait_until(lambda: system.execution_count() >= 5, timeout=30, message="nothing ran")
    system.supervisor.kill("relay", signal.SIGKILL)
    wait_until(
        lambda: system.supervisor.restarts("relay") >= 1,
        timeout=30,
        message="the relay was not restarted",
    )

    states = system.wait_finished(run_ids, timeout=120)
    assert Counter(states.values()) == Counter(completed=len(run_ids))
    # Duplicate messages are dropped before the step's code runs: each step ran once.
    counts = step_counts(system, run_ids)
    assert all(c == Counter(dict.fromkeys(LINEAR_STEPS, 1)) for c in counts.values())
    assert system.supervisor.log("relay").count("relay started") >= 2


def test_the_relay_stops_on_sigterm_with_exit_0_and_another_carries_on(system: System) -> None:
    system.start_worker()
    run_ids = system.start_runs("test.linear", {}, 60)
    system.start_relay(batch_size=10)
    wait_until(lambda: system.execution_count() >= 3, timeout=30, message="nothing ran")

    assert system.supervisor.stop("relay") == 0
    assert "finishing the batch and stopping" in system.supervisor.log("relay")
    assert "relay stopped" in system.supervisor.log("relay")

    system.start_relay(name="relay2", batch_size=10)
    states = system.wait_finished(run_ids, timeout=120)
    assert Counter(states.values()) == Counter(completed=len(run_ids))
