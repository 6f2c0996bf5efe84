"""Schedules without a database: their declaration, their slots and catch-up, on a fake
clock."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from saga import Registry, Schedule, ScheduleError, Workflow
from saga.schedules import slot_key
from saga.testing import FakeClock


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def nightly() -> Workflow:
    wf = Workflow("nightly")
    wf.add_step("a", lambda ctx: 1)
    return wf


def test_interval_slots_are_multiples_of_the_interval_since_the_epoch() -> None:
    every5 = Schedule("s", "w", every=timedelta(minutes=5))

    assert every5.next_slot(at("2026-12-04 20:13:27")) == at("2026-12-04 20:15:00")
    assert every5.next_slot(at("2026-12-04 20:15:00")) == at("2026-12-04 20:20:00")
    assert list(every5.slots(at("2026-12-04 20:15"), at("2026-12-04 20:30"))) == [
        at("2026-12-04 20:15"), at("2026-12-04 20:20"), at("2026-12-04 20:25"),
        at("2026-12-04 20:30"),
    ]


def test_a_cron_schedule_fires_on_the_minutes_its_expression_matches() -> None:
    hourly = Schedule("s", "w", cron="0 * * * *")

    assert hourly.next_slot(at("2026-12-04 20:13")) == at("2026-12-04 21:00")
    assert hourly.spec == "cron 0 * * * *"
    assert Schedule("t", "w", every=90).spec == "every 90s"


def test_a_slot_that_is_not_due_yet_fires_nothing() -> None:
    s = Schedule("s", "w", every=60)

    firing = s.plan(at("2026-12-04 20:14"), now=at("2026-12-04 20:13:59"))

    assert firing.slots == ()
    assert firing.next_slot == at("2026-12-04 20:14")


def test_a_relay_ticking_on_a_fake_clock_fires_every_slot_once_on_time() -> None:
    s = Schedule("s", "w", every=10)
    clock = FakeClock(start="2026-12-04T20:00:03")
    next_slot = s.next_slot(clock())
    fired: list[datetime] = []
    for _ in range(200):  # ticks 0.7 s apart for 140 s
        firing = s.plan(next_slot, clock())
        fired += firing.slots
        assert all(clock() - slot < timedelta(seconds=0.7) for slot in firing.slots)
        next_slot = firing.next_slot
        clock.advance(0.7)

    assert fired == [at("2026-12-04 20:00:10") + timedelta(seconds=10 * i) for i in range(14)]


def test_skip_fires_only_the_latest_missed_slot_after_a_downtime() -> None:
    s = Schedule("s", "w", every=60, catch_up="skip")

    firing = s.plan(at("2026-12-04 20:00"), now=at("2026-12-04 20:30:30"))

    assert firing.slots == (at("2026-12-04 20:30"),)
    assert firing.skipped == 30
    assert firing.next_slot == at("2026-12-04 20:31")


def test_all_fires_every_missed_slot_oldest_first() -> None:
    s = Schedule("s", "w", every=60, catch_up="all")

    firing = s.plan(at("2026-12-04 20:00"), now=at("2026-12-04 20:03:30"))

    assert firing.slots == tuple(at(f"2026-12-04 20:0{i}") for i in range(4))
    assert firing.skipped == 0
    assert firing.next_slot == at("2026-12-04 20:04")


def test_all_fires_at_most_max_catch_up_slots_the_most_recent_ones() -> None:
    by_interval = Schedule("s", "w", every=60, catch_up="all", max_catch_up=3)
    by_cron = Schedule("c", "w", cron="* * * * *", catch_up="all", max_catch_up=3)

    for s in (by_interval, by_cron):
        firing = s.plan(at("2026-12-04 20:00"), now=at("2026-12-04 21:00:00"))

        assert firing.slots == (
            at("2026-12-04 20:58"), at("2026-12-04 20:59"), at("2026-12-04 21:00")
        )
        assert firing.skipped == 58
        assert firing.next_slot == at("2026-12-04 21:01")


def test_a_long_downtime_of_a_short_interval_is_counted_not_stepped() -> None:
    s = Schedule("s", "w", every=1, catch_up="all")

    firing = s.plan(at("2016-12-04 20:00"), now=at("2026-12-04 20:00"))

    assert len(firing.slots) == 100
    assert firing.skipped == 315_532_800 + 1 - 100


def test_each_slot_has_its_own_business_key() -> None:
    assert slot_key("nightly", at("2026-12-04 02:00")) == (
        "schedule:nightly:2026-12-04T02:00:00+00:00"
    )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "has space", "every": 5}, "the name must be"),
        ({"name": "", "every": 5}, "the name must be"),
        ({"name": "n"}, "exactly one of every= or cron="),
        ({"name": "n", "every": 5, "cron": "* * * * *"}, "exactly one of every= or cron="),
        ({"name": "n", "every": 0.5}, "at least 1 second|1 second to 10 years"),
        ({"name": "n", "every": float("nan")}, "1 second to 10 years"),
        ({"name": "n", "every": "5"}, "timedelta or seconds"),
        ({"name": "n", "cron": "61 * * * *"}, "cron: minute: 61 is out of range"),
        ({"name": "n", "every": 5, "catch_up": "some"}, "catch_up must be 'skip' or 'all'"),
        ({"name": "n", "every": 5, "max_catch_up": 0}, "max_catch_up must be"),
        ({"name": "n", "every": 5, "input": {"x": object()}}, r"input\['x'\]"),
    ],
)
def test_a_wrong_declaration_fails_naming_the_schedule(
    kwargs: dict[str, object], message: str
) -> None:
    name = kwargs.pop("name")

    with pytest.raises(ScheduleError, match=message) as caught:
        Schedule(name, "w", **kwargs)  # type: ignore[arg-type]

    assert str(caught.value).startswith(f"schedule {name!r}: ")


def test_a_schedule_of_an_unregistered_workflow_name_is_refused() -> None:
    with pytest.raises(ScheduleError, match="schedule 'n': no workflow 'missing'"):
        Registry().add_schedule(Schedule("n", "missing", every=5))


def test_a_schedule_registers_the_workflow_it_was_given() -> None:
    registry = Registry()
    wf = nightly()

    registry.add_schedule(Schedule("n", wf, every=5))

    assert registry.get("nightly") is wf
    assert [s.name for s in registry.schedules] == ["n"]


def test_two_schedules_of_one_name_are_refused() -> None:
    registry = Registry(nightly())
    registry.add_schedule(Schedule("n", "nightly", every=5))

    with pytest.raises(ScheduleError, match="already registered"):
        registry.add_schedule(Schedule("n", "nightly", every=10))


def test_a_fake_clock_moves_only_when_advanced() -> None:
    clock = FakeClock(start="2026-12-04T20:00:00")

    assert clock() == clock() == at("2026-12-04 20:00")
    assert clock.advance(timedelta(minutes=1)) == at("2026-12-04 20:01")
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(-1)
