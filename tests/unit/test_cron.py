"""The cron parser: five fields, ranges, steps, lists and names, and the next matching minute."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from saga.cron import Cron, CronError


def at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


def test_every_field_takes_a_star_a_number_a_range_a_step_and_a_list() -> None:
    cron = Cron.parse("*/15 9-17 1,15 */3 *")

    assert cron.minutes == {0, 15, 30, 45}
    assert cron.hours == set(range(9, 18))
    assert cron.days == {1, 15}
    assert cron.months == {1, 4, 7, 10}
    assert cron.weekdays == set(range(7))


def test_a_stepped_range_and_a_stepped_start_run_to_their_end() -> None:
    cron = Cron.parse("10-30/10 5/6 * * *")

    assert cron.minutes == {10, 20, 30}
    assert cron.hours == {5, 11, 17, 23}


def test_months_and_week_days_may_be_named_in_any_case_and_sunday_is_0_or_7() -> None:
    cron = Cron.parse("0 0 * JAN-mar Mon,wed,7")

    assert cron.months == {1, 2, 3}
    assert cron.weekdays == {0, 1, 3}


@pytest.mark.parametrize(
    ("expression", "message"),
    [
        ("* * * *", "has 4 fields"),
        ("60 * * * *", "minute: 60 is out of range 0-59"),
        ("* 24 * * *", "hour: 24 is out of range 0-23"),
        ("* * 0 * *", "day of month: 0 is out of range 1-31"),
        ("* * * foo *", "month: 'foo' is not a number"),
        ("*/0 * * * *", "step '0'"),
        ("5-1 * * * *", "runs backwards"),
        ("1,,2 * * * *", "empty list item"),
        ("0 0 31 2 *", "never matches"),
    ],
)
def test_a_bad_expression_is_refused_saying_why(expression: str, message: str) -> None:
    with pytest.raises(CronError, match=message):
        Cron.parse(expression)


def test_the_next_time_is_strictly_after_the_given_one() -> None:
    cron = Cron.parse("*/5 * * * *")

    assert cron.next_after(at("2026-12-04 20:13:27")) == at("2026-12-04 20:15:00")
    assert cron.next_after(at("2026-12-04 20:15:00")) == at("2026-12-04 20:20:00")
    assert cron.next_after(at("2026-12-31 23:59:00")) == at("2027-01-01 00:00:00")


def test_the_next_time_skips_to_the_next_matching_day_and_hour() -> None:
    weekdays = Cron.parse("30 2 * * mon-fri")

    # 2026-12-04 is a Friday: the next weekday 02:30 is Monday's.
    assert weekdays.next_after(at("2026-12-04 20:13")) == at("2026-12-07 02:30")
    assert Cron.parse("0 0 29 2 *").next_after(at("2026-03-01")) == at("2028-02-29 00:00")


def test_a_day_matching_either_restricted_day_field_matches() -> None:
    cron = Cron.parse("0 12 13 * fri")

    # The 13th (a Sunday) and the Friday before it both match.
    assert cron.next_after(at("2026-12-05")) == at("2026-12-11 12:00")
    assert cron.next_after(at("2026-12-11 12:00")) == at("2026-12-13 12:00")


def test_a_time_without_a_time_zone_is_refused() -> None:
    with pytest.raises(ValueError, match="aware"):
        Cron.parse("* * * * *").next_after(datetime(2026, 1, 1))
