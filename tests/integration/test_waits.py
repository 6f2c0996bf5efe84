"""Durable timers and signals, run inline (saga.testing) on the real PostgreSQL: a fake clock
fires sleeps and timeouts, signals are sent in the caller's transaction."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import create_engine
from sqlalchemy.orm import Session

from saga import InputError, RetryPolicy, Saga, Settings, StepContext, Workflow
from saga.cli.config import ExitCode
from saga.cli.main import cli
from saga.errors import SignalRefusedError
from saga.registry import Registry
from saga.steps import WaitStep
from saga.testing import FakeClock, drain, send_signal
from tests.support.publishers import Collect

NOW = RetryPolicy(max_attempts=2, initial_delay=0.01, max_delay=0.01, jitter=0.0)
UNDONE: list[str] = []


def _order(ctx: StepContext) -> dict[str, Any]:
    return {"order": ctx.input.get("order")}


def _undo_order(ctx: StepContext) -> None:
    UNDONE.append(ctx.run_id)


def _ship(ctx: StepContext) -> dict[str, Any]:
    return {"paid": ctx.results["paid"], "slept": "woke_at" in ctx.results["cool_off"]}


def _workflows() -> list[Workflow]:
    checkout = Workflow("w.checkout", retry=NOW)
    checkout.add_step("order", _order, compensate=_undo_order)
    checkout.wait_for_signal(
        "paid", signal="payment_captured", timeout=timedelta(hours=1), after=["order"]
    )
    checkout.sleep("cool_off", for_=timedelta(minutes=30), after=["paid"])
    checkout.add_step("ship", _ship, after=["paid", "cool_off"])
    lenient = Workflow("w.lenient", retry=NOW)
    lenient.wait_for_signal("answer", signal="answer", timeout=60, default={"answer": "none"})
    lenient.add_step("after", lambda ctx: ctx.results["answer"], after=["answer"])
    first = Workflow("w.first", retry=NOW)
    first.wait_for_signal("go", signal="go", timeout=60)
    until = Workflow("w.until", retry=NOW)
    until.sleep("nap", until=lambda ctx: datetime.fromisoformat(ctx.input["at"]))
    return [checkout, lenient, first, until]


@pytest.fixture
def engine(db_url: str) -> Iterator[Saga]:
    UNDONE.clear()
    eng = create_engine(db_url)
    try:
        yield Saga(Registry(*_workflows()), engine=eng, settings=Settings())
    finally:
        eng.dispose()


def _state(saga: Saga, run_id: str, step: str) -> str:
    return next(s["state"] for s in saga.get_run(run_id)["steps"] if s["step"] == step)


def test_a_signal_wakes_its_waiting_step_and_a_sleep_ends_when_the_clock_passes_it(
    engine: Saga,
) -> None:
    clock = FakeClock(engine)
    run = engine.start_now("w.checkout", {"order": 7})
    drain(engine)
    assert _state(engine, run.run_id, "paid") == "suspended"
    assert send_signal(engine, run.run_id, "payment_captured", {"amount": 12}) == "delivered"
    assert _state(engine, run.run_id, "cool_off") == "suspended"
    clock.advance(timedelta(minutes=29))
    assert _state(engine, run.run_id, "cool_off") == "suspended"
    clock.advance(timedelta(minutes=2))
    done = engine.get_run(run.run_id)
    assert done["state"] == "completed"
    assert done["result"] == {"ship": {"paid": {"amount": 12}, "slept": True}}


def test_a_signal_sent_before_the_wait_is_kept_for_it(engine: Saga) -> None:
    with Session(engine.engine) as session, session.begin():
        run = engine.start(session, "w.first", {})
        # In the very transaction that starts the run: atomic with the caller's write.
        assert engine.signal(session, run.run_id, "go", {"n": 1}) == "stored"
    drain(engine)
    assert engine.get_run(run.run_id)["result"] == {"go": {"n": 1}}


def test_a_signal_sent_twice_is_taken_once_and_the_second_is_ignored(engine: Saga) -> None:
    early = engine.start_now("w.checkout", {"order": 1})
    assert engine.signal_now(early.run_id, "payment_captured", {"n": 1}) == "stored"
    assert engine.signal_now(early.run_id, "payment_captured", {"n": 2}) == "duplicate"
    late = engine.start_now("w.checkout", {"order": 2})
    drain(engine)
    assert send_signal(engine, late.run_id, "payment_captured", {"n": 1}) == "delivered"
    assert send_signal(engine, late.run_id, "payment_captured", {"n": 2}) == "duplicate"
    FakeClock(engine).advance(timedelta(hours=1))
    for run in (early, late):
        assert engine.get_run(run.run_id)["result"]["ship"]["paid"] == {"n": 1}


def test_a_signal_rolled_back_with_the_callers_transaction_was_never_sent(
    engine: Saga,
) -> None:
    run = engine.start_now("w.first", {})
    drain(engine)
    with Session(engine.engine) as session, session.begin():
        assert engine.signal(session, run.run_id, "go", 1) == "delivered"
        session.rollback()
    assert _state(engine, run.run_id, "go") == "suspended"
    assert send_signal(engine, run.run_id, "go", 2) == "delivered"
    assert engine.get_run(run.run_id)["result"] == {"go": 2}


def test_a_signal_wait_that_times_out_is_retried_then_the_run_compensates(
    engine: Saga,
) -> None:
    clock = FakeClock(engine)
    run = engine.start_now("w.checkout", {"order": 8})
    drain(engine)
    clock.advance(timedelta(hours=1, seconds=1))
    row = next(s for s in engine.get_run(run.run_id)["steps"] if s["step"] == "paid")
    assert (row["state"], row["attempt"]) == ("suspended", 2)  # the retry waits again
    clock.advance(timedelta(hours=1, seconds=1))
    done = engine.get_run(run.run_id)
    assert done["state"] == "compensated"
    assert done["error"]["type"] == "saga.SignalTimeout"
    assert [run.run_id] == UNDONE


def test_a_signal_after_the_timeout_is_refused_by_the_stopped_run(engine: Saga) -> None:
    clock = FakeClock(engine)
    run = engine.start_now("w.checkout", {"order": 9})
    drain(engine)
    clock.advance(timedelta(hours=3))
    clock.advance(timedelta(hours=3))
    assert engine.get_run(run.run_id)["state"] == "compensated"
    with pytest.raises(SignalRefusedError, match="compensated"):
        engine.signal_now(run.run_id, "payment_captured", {"late": True})


def test_a_timeout_with_a_default_continues_and_a_later_signal_changes_nothing(
    engine: Saga,
) -> None:
    clock = FakeClock(engine)
    run = engine.start_now("w.lenient", {}, key="lenient-1")
    drain(engine)
    clock.advance(timedelta(seconds=61))
    done = engine.get_run(run.run_id)
    assert done["state"] == "completed"
    assert done["result"] == {"after": {"answer": "none"}}
    with pytest.raises(SignalRefusedError, match="completed"):
        engine.signal_now("lenient-1", "answer", {"answer": "late"})


def test_a_signal_to_a_finished_run_is_refused_with_a_clear_error(engine: Saga) -> None:
    run = engine.start_now("w.first", {})
    drain(engine)
    send_signal(engine, run.run_id, "go", None)
    assert engine.get_run(run.run_id)["state"] == "completed"
    with pytest.raises(SignalRefusedError, match=f"run {run.run_id} is completed"):
        engine.signal_now(run.run_id, "go", None)


def test_a_signals_payload_is_checked_like_input(engine: Saga) -> None:
    run = engine.start_now("w.first", {})
    with pytest.raises(InputError, match="NUL"):
        engine.signal_now(run.run_id, "go", {"s": "a\x00b"})
    with pytest.raises(InputError, match="signal"):
        engine.signal_now(run.run_id, "no spaces allowed", 1)


def test_a_sleep_until_a_time_from_the_input_ends_at_that_time(engine: Saga) -> None:
    clock = FakeClock(engine)
    at = datetime.now(UTC) + timedelta(days=2)
    run = engine.start_now("w.until", {"at": at.isoformat()})
    drain(engine)
    row = next(s for s in engine.get_run(run.run_id)["steps"] if s["step"] == "nap")
    assert row["state"] == "suspended" and row["wake_at"] == at
    clock.advance(timedelta(days=1))
    assert _state(engine, run.run_id, "nap") == "suspended"
    clock.advance(timedelta(days=1, seconds=1))
    assert "woke_at" in engine.get_run(run.run_id)["result"]["nap"]


def test_a_sleep_until_a_time_already_past_completes_at_once(engine: Saga) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    run = engine.start_now("w.until", {"at": at.isoformat()})
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "completed"


def test_a_sleep_until_that_returns_no_time_fails_the_step(engine: Saga) -> None:
    run = engine.start_now("w.until", {"at": "2026-01-01T00:00:00"})  # naive: refused
    drain(engine)
    done = engine.get_run(run.run_id)
    assert done["state"] == "failed"
    assert "aware datetime" in done["error"]["message"]


def test_cancelling_a_run_skips_its_suspended_step_and_undoes_the_rest(engine: Saga) -> None:
    clock = FakeClock(engine)
    run = engine.start_now("w.checkout", {"order": 10})
    drain(engine)
    engine.cancel(run.run_id)
    drain(engine)
    assert engine.get_run(run.run_id)["state"] == "cancelled"
    assert _state(engine, run.run_id, "paid") == "skipped"
    clock.advance(timedelta(hours=2))  # nothing is left to wake
    assert [run.run_id] == UNDONE


CLI_REGISTRY = Registry(*_workflows())
"""What ``saga --app tests.integration.test_waits:CLI_REGISTRY`` loads."""


def _saga_cli(db_url: str, *args: str) -> Any:
    app = ["--app", "tests.integration.test_waits:CLI_REGISTRY"] if args[0] == "signal" else []
    return CliRunner().invoke(cli, ["--plain", "--database-url", db_url, *args[:1], *app,
                                    *args[1:]])


def test_saga_signal_delivers_a_json_payload_and_status_shows_what_a_step_waits_for(
    engine: Saga, db_url: str
) -> None:
    run = engine.start_now("w.checkout", {"order": 11}, key="order-11")
    drain(engine)
    shown = _saga_cli(db_url, "status", "order-11")
    assert shown.exit_code == 0, shown.output
    assert "waits for signal 'payment_captured' until" in shown.output
    sent = _saga_cli(db_url, "signal", "order-11", "payment_captured", "--data", '{"amount": 3}')
    assert sent.exit_code == 0, sent.output
    assert "signal 'payment_captured' delivered" in sent.output
    again = _saga_cli(db_url, "signal", "order-11", "payment_captured", "--data", "1", "--json")
    assert again.exit_code == 0 and json.loads(again.output)["outcome"] == "duplicate"
    drain(engine)
    assert "sleeps until" in _saga_cli(db_url, "status", run.run_id).output


def test_saga_signal_errors_are_one_line_with_their_exit_codes(engine: Saga, db_url: str) -> None:
    run = engine.start_now("w.first", {})
    bad_json = _saga_cli(db_url, "signal", run.run_id, "go", "--data", "{nope")
    assert bad_json.exit_code == ExitCode.USAGE
    assert bad_json.output.startswith("saga: error: --data is not JSON")
    unknown = _saga_cli(db_url, "signal", "no-such-run", "go")
    assert unknown.exit_code == ExitCode.NOT_FOUND
    engine.cancel(run.run_id)
    drain(engine)
    refused = _saga_cli(db_url, "signal", run.run_id, "go")
    assert refused.exit_code == ExitCode.INVALID_STATE
    assert f"run {run.run_id} is cancelled: it takes no signal 'go'" in refused.output
    assert len(refused.output.strip().splitlines()) == 1


def test_the_dashboard_shows_what_a_suspended_step_waits_for(engine: Saga) -> None:
    from starlette.testclient import TestClient

    from saga.dashboard.app import create_app

    run = engine.start_now("w.checkout", {"order": 12})
    drain(engine)
    page = TestClient(create_app(engine.engine, engine.tables, saga=engine)).get(
        f"/runs/{run.run_id}"
    )
    assert page.status_code == 200
    assert "state-suspended" in page.text
    assert "waits for signal <code>payment_captured</code> until" in page.text


def test_the_dashboards_signal_action_needs_the_token_and_json_and_completes_the_wait(
    engine: Saga,
) -> None:
    import re

    from starlette.testclient import TestClient

    from saga.dashboard.app import create_app

    run = engine.start_now("w.first", {})
    drain(engine)
    c = TestClient(create_app(engine.engine, engine.tables, saga=engine, token="s3cret"))
    page = c.get(f"/runs/{run.run_id}").text
    assert 'id="signal-go"' in page and 'name="name" value="go"' in page
    found = re.search(r'name="csrf" value="([^"]+)"', page)
    assert found
    form = {"csrf": found[1], "name": "go", "data": '{"n": 1}'}
    refused = c.post(f"/runs/{run.run_id}/signal", data={**form, "token": "guess"})
    assert refused.status_code == 403 and "operator token" in refused.text
    bad = c.post(f"/runs/{run.run_id}/signal", data={**form, "token": "s3cret", "data": "{"})
    assert bad.status_code == 400 and "not JSON" in bad.text
    assert _state(engine, run.run_id, "go") == "suspended"
    sent = c.post(f"/runs/{run.run_id}/signal", data={**form, "token": "s3cret"},
                  follow_redirects=False)
    assert sent.status_code == 303 and "delivered" in sent.headers["location"]
    drain(engine)
    assert engine.get_run(run.run_id)["result"] == {"go": {"n": 1}}
    assert 'id="signal-go"' not in c.get(f"/runs/{run.run_id}").text
    again = c.post(f"/runs/{run.run_id}/signal", data={**form, "token": "s3cret"})
    assert again.status_code == 409  # the run has ended: it refuses the signal


def test_a_signal_sent_while_its_wait_begins_is_not_missed(engine: Saga) -> None:
    import threading

    from sqlalchemy import text

    from saga.core.attempts import AttemptRef
    from saga.waits import Suspension
    from tests.support.waiting import wait_until

    def blocked() -> bool:
        with engine.engine.connect() as conn:
            return bool(conn.execute(text(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event_type = 'Lock'"
            )).scalar_one())

    wf = engine.registry.get("w.first")
    run = engine.start_now("w.first", {})
    ref = AttemptRef(run.run_id, "step", "go", 1)
    with engine.autocommit() as conn:  # a worker has claimed the wait, not begun it yet
        claim = engine.transitions.claim(
            conn, ref, workflow=wf.name, version=wf.version, definition_hash=wf.definition_hash,
            deps=(), lease_seconds=30, token="w:1",
        )
    assert claim is not None and claim.claimed
    runner = wf["go"].runner
    assert isinstance(runner, WaitStep)
    ctx = StepContext(run_id=run.run_id, workflow=wf.name, step="go", kind="step", attempt=1,
                      input={}, results={}, idempotency_key="k")
    begun: list[Suspension] = []
    worker = threading.Thread(target=lambda: begun.append(engine.waits.begin(ref, "w:1",
                                                                             runner, ctx)))
    with Session(engine.engine) as session, session.begin():
        # The step is running, not suspended: the signal is stored, for the wait to find.
        assert engine.signal(session, run.run_id, "go", "just in time") == "stored"
        worker.start()  # the wait begins while the signal is not committed yet
        wait_until(blocked, timeout=20, message="the wait did not wait for the signal's lock")
    worker.join(timeout=30)
    assert begun == [Suspension(result='"just in time"')]  # completes with it, not suspended
    assert _state(engine, run.run_id, "go") == "running"


def test_the_relay_fires_a_due_timer_and_publishes_the_step_after_it(db_url: str) -> None:
    import threading

    from saga.relay import Relay
    from tests.support.waiting import wait_until

    wf = Workflow("w.short", retry=NOW)
    wf.sleep("nap", for_=timedelta(milliseconds=300))
    wf.add_step("after", lambda ctx: ctx.results["nap"], after=["nap"])
    eng = create_engine(db_url)
    saga = Saga(Registry(wf), engine=eng, settings=Settings())
    collect = Collect()
    relay = Relay(saga, collect, poll_interval=0.2)
    loop = threading.Thread(target=relay.run)
    try:
        run = saga.start_now("w.short", {})
        drain(saga)  # the nap is suspended: no message is left
        assert _state(saga, run.run_id, "nap") == "suspended"
        loop.start()
        wait_until(lambda: (run.run_id, "after") in collect.steps, timeout=20,
                   message="the relay did not fire the timer")
        assert _state(saga, run.run_id, "nap") == "completed"
        assert _state(saga, run.run_id, "after") == "ready"
    finally:
        relay.stop()
        loop.join(timeout=10)
        eng.dispose()


def test_a_timer_that_cannot_be_woken_is_logged_and_the_others_still_wake(
    engine: Saga, caplog: pytest.LogCaptureFixture
) -> None:
    from sqlalchemy import text

    clock = FakeClock(engine)
    broken = engine.start_now("w.until", {"at": "2099-01-01T00:00:00+00:00"})
    fine = engine.start_now("w.until", {"at": "2099-01-01T00:00:01+00:00"})
    drain(engine)
    # A row the database refuses to wake (as a bug or a bad row would).
    with engine.engine.begin() as conn:
        conn.execute(text("ALTER TABLE saga.step_runs ADD CONSTRAINT no_nap_of_broken CHECK "
                          f"(NOT (run_id = '{broken.run_id}' AND state = 'running'))"))
    clock.advance(timedelta(days=365 * 80))
    assert engine.get_run(fine.run_id)["state"] == "completed"
    assert _state(engine, broken.run_id, "nap") == "suspended"
    assert "could not wake a step" in caplog.text
