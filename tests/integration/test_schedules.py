"""Schedules fired against the real PostgreSQL on a fake clock: a run per slot, never two,
even when firing loops race; the catch-up policies after a downtime."""

from __future__ import annotations

import threading
from datetime import timedelta
from typing import Any

from sqlalchemy import text

from saga import Saga, Schedule
from saga.scheduler import Scheduler
from saga.testing import FakeClock, drain, fire_schedules
from tests.support.waiting import wait_until


def schedule_row(saga: Saga, name: str) -> dict[str, Any]:
    with saga.engine.connect() as conn:
        row = conn.execute(
            text("SELECT * FROM saga.schedules WHERE name = :n"), {"n": name}
        ).mappings().one()
    return dict(row)


def slot_runs(saga: Saga, name: str) -> list[tuple[str, str]]:
    with saga.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT business_key, state FROM saga.runs WHERE business_key LIKE :p"
                 " ORDER BY business_key"),
            {"p": f"schedule:{name}:%"},
        )
        return [(r[0], r[1]) for r in rows]


def test_a_due_slot_starts_one_run_under_its_key_and_advances_the_schedule(
    saga_engine: Saga,
) -> None:
    saga_engine.schedule(Schedule("tick", "it.linear", every=60, input={"n": 1}))
    clock = FakeClock(start="2026-12-04T20:00:30")

    assert fire_schedules(saga_engine, clock) == []  # declared: the first slot is 20:01
    clock.set("2026-12-04T20:01:00.200")
    started = fire_schedules(saga_engine, clock)
    drain(saga_engine)

    assert started == ["schedule:tick:2026-12-04T20:01:00+00:00"]
    assert slot_runs(saga_engine, "tick") == [(started[0], "completed")]
    row = schedule_row(saga_engine, "tick")
    assert row["last_slot"].isoformat() == "2026-12-04T20:01:00+00:00"
    assert row["next_slot"].isoformat() == "2026-12-04T20:02:00+00:00"
    assert (row["fired"], row["skipped"], row["spec"]) == (1, 0, "every 60s")
    assert saga_engine.get_run(started[0])["input"] == {"n": 1}


def test_firing_again_in_the_same_slot_starts_nothing_more(saga_engine: Saga) -> None:
    saga_engine.schedule(Schedule("tick", "it.linear", every=60))
    clock = FakeClock(start="2026-12-04T20:00:30")
    first, second = Scheduler(saga_engine, clock), Scheduler(saga_engine, clock)
    first.declare()
    clock.set("2026-12-04T20:01:05")

    assert first.fire_due() == 1
    assert second.fire_due() == 0
    assert first.fire_due() == 0
    assert len(slot_runs(saga_engine, "tick")) == 1


def test_two_racing_firing_loops_start_each_of_20_slots_exactly_once(
    saga_engine: Saga,
) -> None:
    saga_engine.schedule(Schedule("race", "it.linear", every=1))
    clock = FakeClock(start="2026-12-04T20:00:00.500")
    Scheduler(saga_engine, clock).declare()
    done = threading.Event()
    started = [0, 0]
    errors: list[BaseException] = []

    def loop(i: int) -> None:
        scheduler = Scheduler(saga_engine, clock)
        try:
            while not done.is_set():
                started[i] += scheduler.fire_due()
        except BaseException as exc:  # reported by the test below
            errors.append(exc)

    threads = [threading.Thread(target=loop, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for _ in range(20):
        clock.advance(1)
        # Wait (with a deadline) for this slot to be fired before moving the clock on.
        want = clock().replace(microsecond=0)
        wait_until(
            lambda: schedule_row(saga_engine, "race")["last_slot"] == want,  # noqa: B023
            timeout=10, interval=0.01, message=f"slot {want} not fired",
        )
    done.set()
    for t in threads:
        t.join(timeout=10)

    assert errors == []
    keys = [k for k, _ in slot_runs(saga_engine, "race")]
    assert len(keys) == len(set(keys)) == 20
    assert keys[0] == "schedule:race:2026-12-04T20:00:01+00:00"
    assert keys[-1] == "schedule:race:2026-12-04T20:00:20+00:00"
    assert sum(started) == 20
    assert schedule_row(saga_engine, "race")["fired"] == 20


def test_skip_fires_only_the_latest_missed_slot_after_a_downtime(saga_engine: Saga) -> None:
    saga_engine.schedule(Schedule("skipper", "it.linear", every=60, catch_up="skip"))
    clock = FakeClock(start="2026-12-04T20:00:30")
    fire_schedules(saga_engine, clock)

    clock.set("2026-12-04T20:10:30")  # no relay ran from 20:00:30 to 20:10:30
    started = fire_schedules(saga_engine, clock)

    assert started == ["schedule:skipper:2026-12-04T20:10:00+00:00"]
    row = schedule_row(saga_engine, "skipper")
    assert (row["fired"], row["skipped"]) == (1, 9)
    assert row["next_slot"].isoformat() == "2026-12-04T20:11:00+00:00"


def test_all_fires_every_missed_slot_up_to_its_bound(saga_engine: Saga) -> None:
    saga_engine.schedule(
        Schedule("all", "it.linear", cron="* * * * *", catch_up="all", max_catch_up=5)
    )
    saga_engine.schedule(Schedule("all3", "it.linear", every=60, catch_up="all"))
    clock = FakeClock(start="2026-12-04T20:00:30")
    fire_schedules(saga_engine, clock)

    clock.set("2026-12-04T20:10:30")
    started = fire_schedules(saga_engine, clock)

    assert [k for k in started if k.startswith("schedule:all:")] == [
        f"schedule:all:2026-12-04T20:{m:02d}:00+00:00" for m in range(6, 11)
    ]
    assert len([k for k in started if k.startswith("schedule:all3:")]) == 10
    assert (schedule_row(saga_engine, "all")["skipped"]) == 5
    drain(saga_engine)
    assert {state for _, state in slot_runs(saga_engine, "all3")} == {"completed"}


def test_a_changed_interval_starts_from_its_own_next_slot(saga_engine: Saga) -> None:
    saga_engine.schedule(Schedule("changing", "it.linear", every=3600))
    clock = FakeClock(start="2026-12-04T20:00:30")
    fire_schedules(saga_engine, clock)
    assert schedule_row(saga_engine, "changing")["next_slot"].isoformat() == (
        "2026-12-04T21:00:00+00:00"
    )
    saga_engine.registry._schedules.clear()  # a new deploy declares it anew
    saga_engine.schedule(Schedule("changing", "it.linear", every=60))

    clock.set("2026-12-04T20:01:10")
    started = fire_schedules(saga_engine, clock)

    assert started == []  # re-declared at 20:01:10: its first slot is 20:02
    row = schedule_row(saga_engine, "changing")
    assert (row["spec"], row["next_slot"].isoformat()) == (
        "every 60s", "2026-12-04T20:02:00+00:00"
    )


def test_a_refused_schedule_is_left_alone_for_a_pause_and_the_others_go_on(
    saga_engine: Saga, caplog: Any
) -> None:
    saga_engine.schedule(Schedule("big", "it.linear", every=60, input={"x": "y" * 2000}))
    saga_engine.schedule(Schedule("small", "it.linear", every=60))
    clock = FakeClock(start="2026-12-04T20:00:30")
    scheduler = Scheduler(saga_engine, clock)
    scheduler.declare()
    clock.advance(timedelta(minutes=1))

    assert scheduler.fire_due() == 1  # small's slot; big's start refused (the integration
    # engine refuses inputs over 1024 bytes)
    clock.advance(timedelta(minutes=1))
    assert scheduler.fire_due() == 1  # small again; big left alone

    refused = [r.getMessage() for r in caplog.records if "schedule not fired" in r.getMessage()]
    assert len(refused) == 1 and "schedule=big" in refused[0]
    assert schedule_row(saga_engine, "small")["fired"] == 2
    assert schedule_row(saga_engine, "big")["next_slot"].isoformat() == (
        "2026-12-04T20:01:00+00:00"
    )


def test_the_relay_loop_fires_slots_as_they_fall_due(saga_engine: Saga) -> None:
    from saga.executor import Executor
    from saga.relay import Relay
    from saga.testing import InlinePublisher

    saga_engine.schedule(Schedule("looped", "it.linear", every=1))
    relay = Relay(saga_engine, InlinePublisher(Executor(saga_engine, worker_id="t")))
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        wait_until(
            lambda: len(slot_runs(saga_engine, "looped")) >= 3, timeout=30,
            message="the relay did not fire three slots",
        )
    finally:
        relay.stop()
        thread.join(timeout=10)

    keys = [k for k, _ in slot_runs(saga_engine, "looped")]
    assert len(keys) == len(set(keys))
    assert schedule_row(saga_engine, "looped")["fired"] == len(keys)


def test_saga_schedules_lists_each_schedule_with_its_last_and_next_slot(
    saga_engine: Saga, db_url: str
) -> None:
    import json

    from click.testing import CliRunner

    from saga.cli.main import cli

    def invoke(*args: str) -> Any:
        return CliRunner().invoke(
            cli, ["--plain", "--database-url", db_url, "schedules", *args],
            catch_exceptions=False,
        )

    empty = invoke()
    assert (empty.exit_code, empty.stdout.count("\n")) == (0, 1)  # the header alone
    assert "no schedules" in empty.stderr
    saga_engine.schedule(Schedule("nightly", "it.linear", cron="0 2 * * *", catch_up="all"))
    saga_engine.schedule(Schedule("often", "it.linear", every=60))
    clock = FakeClock(start="2026-12-04T20:00:30")
    fire_schedules(saga_engine, clock)
    clock.set("2026-12-04T20:01:00")
    fire_schedules(saga_engine, clock)

    table = invoke()
    doc = json.loads(invoke("--json").stdout)

    assert table.exit_code == 0
    lines = table.stdout.splitlines()
    assert lines[0].split()[:4] == ["NAME", "WORKFLOW", "WHEN", "CATCH-UP"]
    assert lines[1].startswith("nightly") and "cron 0 2 * * *" in lines[1]
    assert "2026-12-05 02:00:00" in lines[1]
    assert lines[2].startswith("often") and "2026-12-04 20:01:00" in lines[2]
    assert [s["name"] for s in doc["schedules"]] == ["nightly", "often"]
    often = doc["schedules"][1]
    assert (often["spec"], often["catch_up"], often["fired"]) == ("every 60s", "skip", 1)
    assert often["last_slot"].startswith("2026-12-04T20:01:00")
    assert often["next_slot"].startswith("2026-12-04T20:02:00")
    assert often["last_run_id"] == str(
        saga_engine.get_run("schedule:often:2026-12-04T20:01:00+00:00")["id"]
    )


def test_a_database_error_while_firing_is_logged_once_and_tried_again_later(
    saga_engine: Saga, caplog: Any
) -> None:
    saga_engine.schedule(Schedule("tick", "it.linear", every=60))
    with saga_engine.engine.begin() as conn:  # as if the schema were not migrated yet
        conn.execute(text("ALTER TABLE saga.schedules RENAME TO schedules_away"))
    scheduler = Scheduler(saga_engine, FakeClock(start="2026-12-04T20:00:30"))

    assert scheduler.tick() == 0
    assert scheduler.tick() == 0  # paused: no second attempt, no second line

    failures = [r for r in caplog.records if "firing schedules failed" in r.getMessage()]
    assert len(failures) == 1
    assert "schedules" in failures[0].getMessage()
    with saga_engine.engine.begin() as conn:
        conn.execute(text("ALTER TABLE saga.schedules_away RENAME TO schedules"))
    scheduler._paused_until = 0.0  # the pause is over
    assert scheduler.tick() == 0
    assert schedule_row(saga_engine, "tick")["spec"] == "every 60s"
