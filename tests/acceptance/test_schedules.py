"""Schedules fired by real relay processes: two relays with one schedule fire each of 20
slots exactly once, one of them SIGKILLed midway."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta

import pytest
from sqlalchemy import text

from tests.acceptance.conftest import System, WorkflowsOf
from tests.support.waiting import wait_until


@pytest.fixture
def system_app() -> tuple[str, WorkflowsOf]:
    from tests.apps import scheduled

    return "tests.apps.scheduled:app", scheduled.workflows


def slot_keys(system: System) -> list[str]:
    with system.engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT business_key FROM saga.runs WHERE workflow = 'test.scheduled'"
                 " ORDER BY business_key")
        )
        return [str(r[0]) for r in rows]


def fired(system: System) -> int:
    with system.engine.engine.connect() as conn:
        found = conn.execute(
            text("SELECT fired FROM saga.schedules WHERE name = 'every-second'")
        ).scalar()
    return int(found or 0)


def test_two_relays_fire_each_of_20_slots_exactly_once_across_a_relay_kill(
    system: System,
) -> None:
    system.start_relay("relay-a")
    system.start_relay("relay-b")
    wait_until(lambda: fired(system) >= 8, timeout=60, message="8 slots were not fired")

    seen = len(system.supervisor.log("relay-b"))
    system.supervisor.kill("relay-a", signal.SIGKILL)  # the supervisor restarts it
    wait_until(
        lambda: "schedule fired" in system.supervisor.log("relay-b")[seen:], timeout=30,
        message="relay-b did not go on firing after relay-a was killed",
    )
    wait_until(
        lambda: system.supervisor.log("relay-a").count("relay started") >= 2, timeout=30,
        message="relay-a was not restarted",
    )
    wait_until(lambda: fired(system) >= 24, timeout=60, message="24 slots were not fired")
    for name in ("relay-a", "relay-b"):
        assert system.supervisor.stop(name) == 0

    keys = slot_keys(system)
    assert len(keys) == len(set(keys)) == fired(system)
    slots = [datetime.fromisoformat(k.removeprefix("schedule:every-second:")) for k in keys]
    first20 = slots[:20]
    # Twenty consecutive slots, one second apart: none skipped, none fired twice.
    assert first20 == [first20[0] + timedelta(seconds=i) for i in range(20)]
    assert slots == [slots[0] + timedelta(seconds=i) for i in range(len(slots))]
    logs = "".join(system.supervisor.log(n) for n in ("relay-a", "relay-b"))
    # Each run was logged once by the relay that started it (but the killed relay may have
    # died between its commit and its log line).
    assert len(keys) - 1 <= logs.count("schedule fired") <= len(keys)
    assert "schedule slot had its run" not in logs
