"""Durable timers and signal waits against real processes: a sleep and a wait outlive the
SIGKILL of the worker and of the relay and a restart of Redis that loses every message."""

from __future__ import annotations

import signal
from collections import Counter
from datetime import datetime
from typing import Any

import pytest
from sqlalchemy import text

from tests.acceptance.conftest import RedisServer, System, WorkflowsOf
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    from tests.apps import waiting

    return "tests.apps.waiting:app", waiting.workflows


def _suspended(system: System, run_ids: list[str]) -> set[str]:
    with system.engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT run_id::text FROM saga.step_runs "
                 "WHERE state = 'suspended' AND run_id = ANY(CAST(:ids AS uuid[]))"),
            {"ids": run_ids},
        ).all()
    return {r[0] for r in rows}


def _restarted(system: System, name: str, times: int) -> bool:
    return system.supervisor.restarts(name) >= times and system.supervisor.running(name)


def test_a_timer_and_a_signal_wait_survive_sigkill_of_worker_and_relay_and_a_redis_restart(
    system: System, redis_server: RedisServer
) -> None:
    system.start_worker("worker")
    system.start_relay()
    # The sleep ends well after everything was killed and restarted.
    sleepy = system.start_runs("w.sleepy", {"seconds": 20})
    signalled = system.start_runs("w.signalled", {})
    both = sleepy + signalled
    wait_until(lambda: _suspended(system, both) == set(both), timeout=60,
               message="the sleep and the wait did not begin")

    # Nothing is held in a worker or the broker while they wait: kill everything.
    system.supervisor.kill("worker", signal.SIGKILL)
    system.supervisor.kill("relay", signal.SIGKILL)
    with redis_server.outage():
        wait_until(lambda: _restarted(system, "relay", 1), timeout=30,
                   message="the relay did not come back")
    system.wait_ready("worker", times=2)
    assert _suspended(system, signalled) == set(signalled)  # still waiting, for its signal

    outcome = system.engine.signal_now(signalled[0], "payment_captured", {"amount": 12})
    assert outcome == "delivered"
    states = system.wait_finished(both, timeout=90)
    assert states == dict.fromkeys(both, "completed")

    ran = Counter((e["run_id"], e["step"]) for e in system.executions(both))
    assert ran == Counter({(r, s): 1 for r in both for s in ("begin", "end")})
    paid: dict[str, Any] = next(
        s for s in system.run(signalled[0])["steps"] if s["step"] == "paid"
    )
    assert paid["result"] == {"amount": 12}
    steps = {s["step"]: s for s in system.run(sleepy[0])["steps"]}
    due = datetime.fromisoformat(steps["begin"]["result"]["due"])
    assert datetime.fromisoformat(steps["nap"]["result"]["woke_at"]) == due
    assert steps["nap"]["finished_at"] >= due  # woken at its time, never before
