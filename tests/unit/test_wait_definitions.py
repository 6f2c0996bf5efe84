"""Declaring sleeps and signal waits: a wrong one fails when declared, naming the step."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from saga import DefinitionError, StepContext, Workflow
from saga.steps import Sleep, WaitForSignal


def _ctx(**fields: Any) -> StepContext:
    base: dict[str, Any] = {"run_id": "r", "workflow": "w", "step": "nap", "kind": "step",
                            "attempt": 1, "input": {}, "results": {},
                            "idempotency_key": "k"}
    return StepContext(**{**base, **fields})


@pytest.mark.parametrize("bad", [0, -1, float("inf"), float("nan"), "1h", True,
                                 timedelta(seconds=-5), timedelta(0)])
def test_a_sleep_with_a_bad_duration_is_refused_naming_the_step(bad: Any) -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'nap'.*for_ must be a timedelta"):
        wf.sleep("nap", for_=bad)


def test_a_sleep_needs_exactly_one_of_a_duration_and_a_time() -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match="exactly one of for_ or until"):
        wf.sleep("nap")
    with pytest.raises(DefinitionError, match="exactly one of for_ or until"):
        wf.sleep("nap", for_=1, until=lambda ctx: datetime.now(UTC))
    with pytest.raises(DefinitionError, match=r"step 'raw'.*exactly one"):
        wf.add_step("raw", Sleep())


@pytest.mark.parametrize("bad", [0, -3, "soon", None])
def test_a_signal_wait_with_a_bad_timeout_is_refused_naming_the_step(bad: Any) -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'paid'.*timeout must be"):
        wf.wait_for_signal("paid", signal="payment_captured", timeout=bad)


@pytest.mark.parametrize("bad", ["", "has space", "x" * 101, 3])
def test_a_signal_wait_with_a_bad_signal_name_is_refused(bad: Any) -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'paid'.*signal name"):
        wf.wait_for_signal("paid", signal=bad, timeout=60)


def test_a_signal_waits_default_must_be_storable_json() -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'paid'.*default is not storable"):
        wf.wait_for_signal("paid", signal="p", timeout=60, default={"at": object()})
    wf.wait_for_signal("ok", signal="p", timeout=60, default=None)  # null is a default
    runner = wf["ok"].runner
    assert isinstance(runner, WaitForSignal) and runner.has_default


def test_a_wait_has_nothing_to_undo() -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'nap'.*no compensation"):
        wf.add_step("nap", Sleep(seconds=5), compensate=lambda ctx: None)
    wf.sleep("later", for_=5)
    with pytest.raises(DefinitionError, match=r"step 'later'.*no compensation"):
        wf.compensation("later")(lambda ctx: None)


def test_waits_take_part_in_the_graph_and_its_hash() -> None:
    wf = Workflow("w")
    wf.add_step("a", lambda ctx: 1)
    wf.wait_for_signal("paid", signal="p", timeout=timedelta(hours=1), after=["a"])
    wf.sleep("nap", for_=timedelta(minutes=5), after=["paid"])
    assert wf.after_map == {"a": (), "paid": ("a",), "nap": ("paid",)}
    other = Workflow("w")
    other.add_step("a", lambda ctx: 1)
    other.add_step("paid", lambda ctx: 1, after=["a"])
    other.add_step("nap", lambda ctx: 1, after=["paid"])
    assert wf.definition_hash != other.definition_hash
    runner = wf["nap"].runner
    assert isinstance(runner, Sleep) and runner.seconds == 300.0


def test_a_sleep_until_must_give_an_aware_time() -> None:
    sleep = Sleep(until=lambda ctx: datetime.fromisoformat(ctx.input["at"]))
    now = datetime.now(UTC)
    at = now + timedelta(hours=2)
    assert sleep.wake_at(_ctx(input={"at": at.isoformat()}), now) == at
    with pytest.raises(ValueError, match="aware datetime"):
        sleep.wake_at(_ctx(input={"at": "2026-01-01T00:00:00"}), now)
    assert Sleep(seconds=60).wake_at(_ctx(), now) == now + timedelta(minutes=1)


def test_a_fake_clock_does_not_go_back() -> None:
    from saga import Registry, Saga
    from saga.testing import FakeClock

    clock = FakeClock(Saga(Registry(), database_url="postgresql://127.0.0.1/not_used"))
    with pytest.raises(ValueError, match="does not go back"):
        clock.advance(timedelta(seconds=-1))
    assert clock.moved == timedelta(0)
