"""The core transitions against the real PostgreSQL server: start, claim, complete, fail."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from saga import InputError, Saga, UnknownWorkflowError
from saga.codec import dumps
from saga.core import graph
from saga.core.attempts import AttemptRef
from saga.testing import drain


def count(saga: Saga, sql: str, **params: Any) -> int:
    with saga.engine.connect() as conn:
        return int(conn.execute(text(sql), params).scalar() or 0)


def outbox(saga: Saga) -> list[tuple[str, str, int]]:
    with saga.engine.connect() as conn:
        rows = conn.execute(text("SELECT step, kind, attempt FROM saga.outbox ORDER BY id"))
        return [(r[0], r[1], r[2]) for r in rows]


TOKEN = "test:claim"


def claim(
    saga: Saga,
    run_id: str,
    step: str,
    attempt: int = 1,
    deps: tuple[str, ...] = (),
    token: str = TOKEN,
) -> Any:
    """Claim the attempt as a worker would; ``None`` unless it was claimed."""
    wf = saga.registry.get(saga.get_run(run_id)["workflow"])
    with saga.autocommit() as conn:
        found = saga.transitions.claim(
            conn,
            AttemptRef(run_id, "step", step, attempt),
            workflow=wf.name,
            version=wf.version,
            definition_hash=wf.definition_hash,
            deps=deps,
            lease_seconds=30,
            token=token,
        )
    return found if found is not None and found.claimed else None


def complete(saga: Saga, run_id: str, step: str, result: Any, attempt: int = 1) -> Any:
    wf = saga.registry.get(saga.get_run(run_id)["workflow"])
    release = graph.dependents(wf.after_map)[step]
    with saga.autocommit() as conn:
        return saga.transitions.complete(
            conn,
            AttemptRef(run_id, "step", step, attempt),
            dumps(result),
            token=TOKEN,
            release=release,
            routes=[wf.route(s) for s in release],
            sink=not release,
        )


def test_start_writes_the_run_its_steps_and_its_first_messages(saga_engine: Saga) -> None:
    started = saga_engine.start_now("it.diamond", {"order": 1})
    run = saga_engine.get_run(started.run_id)
    assert run["state"] == "running"
    assert run["definition_hash"] == saga_engine.registry.get("it.diamond").definition_hash
    states = {s["step"]: (s["state"], s["pending_deps"]) for s in run["steps"]}
    assert states == {
        "a": ("ready", 0),
        "b": ("waiting", 1),
        "c": ("waiting", 1),
        "d": ("waiting", 2),
    }
    assert outbox(saga_engine) == [("a", "step", 1)]


def test_a_rolled_back_start_leaves_nothing(saga_engine: Saga) -> None:
    with Session(saga_engine.engine) as session:
        session.execute(text("CREATE TABLE orders (id int primary key)"))
        session.commit()
        session.execute(text("INSERT INTO orders VALUES (1)"))
        saga_engine.start(session, "it.linear", {"order": 1})
        session.rollback()
    for table in ("saga.runs", "saga.step_runs", "saga.outbox", "saga.history", "orders"):
        assert count(saga_engine, f"SELECT count(*) FROM {table}") == 0, table


def test_a_committed_start_commits_with_the_business_write(saga_engine: Saga) -> None:
    with Session(saga_engine.engine) as session:
        session.execute(text("CREATE TABLE orders (id int primary key)"))
        session.execute(text("INSERT INTO orders VALUES (1)"))
        saga_engine.start(session, "it.linear", {"order": 1})
        session.commit()
    assert count(saga_engine, "SELECT count(*) FROM orders") == 1
    assert count(saga_engine, "SELECT count(*) FROM saga.runs") == 1


def test_starting_again_with_the_same_business_key_returns_the_existing_run(
    saga_engine: Saga,
) -> None:
    first = saga_engine.start_now("it.linear", {"n": 1}, key="order-9f2a")
    again = saga_engine.start_now("it.linear", {"n": 1}, key="order-9f2a")
    assert first.created and not again.created
    assert again.run_id == first.run_id
    assert count(saga_engine, "SELECT count(*) FROM saga.runs") == 1
    assert len(outbox(saga_engine)) == 1
    other = saga_engine.start_now("it.diamond", {"n": 1}, key="order-9f2a")
    assert other.created, "a key is unique per workflow, not across workflows"


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ({"amount": object()}, "input['amount']: a object is not JSON-serializable"),
        ({"items": [1, float("nan")]}, "input['items'][1]: nan is not valid JSON"),
        ({1: "x"}, "key 1 is not a string"),
        ({"blob": "x" * 2000}, "over the limit of 1024"),
    ],
)
def test_bad_input_is_refused_at_start_and_writes_nothing(
    saga_engine: Saga, value: Any, fragment: str
) -> None:
    with pytest.raises(InputError) as caught:
        saga_engine.start_now("it.linear", value)
    assert "it.linear" in str(caught.value)
    assert fragment in str(caught.value)
    assert count(saga_engine, "SELECT count(*) FROM saga.runs") == 0


def test_starting_an_unknown_workflow_is_refused(saga_engine: Saga) -> None:
    with pytest.raises(UnknownWorkflowError, match="nope"):
        saga_engine.start_now("nope", {})


def test_a_linear_run_is_driven_through_the_transitions(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    assert claim(saga_engine, run_id, "a") is not None
    assert outbox(saga_engine) == [], "a claim consumes its message"
    done = complete(saga_engine, run_id, "a", 1)
    assert done.ready == ("b",) and done.run_state == "running"
    got = claim(saga_engine, run_id, "b", deps=("a",))
    assert got.results == {"a": 1}
    assert complete(saga_engine, run_id, "b", 2).ready == ("c",)
    claim(saga_engine, run_id, "c", deps=("b",))
    last = complete(saga_engine, run_id, "c", 3)
    assert last.run_state == "completed" and last.ready == ()
    run = saga_engine.get_run(run_id)
    assert run["result"] == {"c": 3}
    assert run["finished_at"] is not None
    events = [h["event"] for h in run["history"]]
    assert events[0] == "run_started" and events[-1] == "run_completed"
    assert events.count("step_completed") == 3


def test_a_diamond_readies_its_join_only_after_both_branches(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.diamond", {}).run_id
    claim(saga_engine, run_id, "a")
    assert set(complete(saga_engine, run_id, "a", "a").ready) == {"b", "c"}
    claim(saga_engine, run_id, "b", deps=("a",))
    claim(saga_engine, run_id, "c", deps=("a",))
    assert complete(saga_engine, run_id, "b", "ab").ready == ()
    assert complete(saga_engine, run_id, "c", "ac").ready == ("d",)
    got = claim(saga_engine, run_id, "d", deps=("b", "c"))
    assert got.results == {"b": "ab", "c": "ac"}


def test_the_inline_runner_finishes_a_diamond(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.diamond", {}).run_id
    outcomes = drain(saga_engine)
    assert [o for _, o in outcomes] == ["completed"] * 4
    assert saga_engine.get_run(run_id)["result"] == {"d": "abac"}


def test_a_stale_or_duplicate_completion_changes_nothing(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    assert complete(saga_engine, run_id, "a", 1) is None, "not claimed yet"
    claim(saga_engine, run_id, "a")
    assert claim(saga_engine, run_id, "a", token="other") is None, "a second claim of one attempt"
    assert complete(saga_engine, run_id, "a", 1, attempt=2) is None, "wrong attempt"
    assert complete(saga_engine, run_id, "a", 1) is not None
    assert complete(saga_engine, run_id, "a", 99, attempt=2) is None, "already completed"
    run = saga_engine.get_run(run_id)
    a = next(s for s in run["steps"] if s["step"] == "a")
    assert a["result"] == 1
    assert [h["event"] for h in run["history"]].count("step_completed") == 1
    assert outbox(saga_engine) == [("b", "step", 1)]


def test_a_claim_run_again_after_its_reply_was_lost_finds_its_own_claim(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    assert claim(saga_engine, run_id, "a", token="worker-1:x") is not None
    again = claim(saga_engine, run_id, "a", token="worker-1:x")
    assert again is not None and again.claimed, "the same execution's claim is its own"
    assert claim(saga_engine, run_id, "a", token="worker-2:y") is None
    assert count(saga_engine, "SELECT count(*) FROM saga.history WHERE event = 'step_started'") == 1


def test_a_completion_run_again_after_its_reply_was_lost_returns_what_it_made_ready(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.diamond", {}).run_id
    claim(saga_engine, run_id, "a")
    first = complete(saga_engine, run_id, "a", "a")
    assert first.ready == ("b", "c") and not first.replayed
    again = complete(saga_engine, run_id, "a", "a")
    assert again is not None and again.replayed
    assert again.ready == ("b", "c")
    assert [q["attempt"] for q in again.queued] == [1, 1]
    completions = "SELECT count(*) FROM saga.history WHERE event = 'step_completed'"
    assert count(saga_engine, completions) == 1


def test_a_fifty_way_join_completed_from_fifty_connections_is_ready_exactly_once(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.fan50", {}).run_id
    branches = [f"b{i:02d}" for i in range(50)]
    for b in branches:
        assert claim(saga_engine, run_id, b) is not None
    barrier = threading.Barrier(50)
    results: list[Any] = []
    errors: list[BaseException] = []

    def finish(step: str) -> None:
        try:
            wf = saga_engine.registry.get("it.fan50")
            with saga_engine.autocommit() as conn:
                conn.execute(text("SELECT 1"))  # connect before the barrier
                barrier.wait(timeout=30)
                results.append(
                    saga_engine.transitions.complete(
                        conn,
                        AttemptRef(run_id, "step", step, 1),
                        "{}",
                        token=TOKEN,
                        release=["join"],
                        routes=[wf.route("join")],
                        sink=False,
                    )
                )
        except BaseException as exc:  # pragma: no cover - surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=finish, args=(b,)) for b in branches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert len(results) == 50 and all(r is not None for r in results)
    assert sum(1 for r in results if r.ready == ("join",)) == 1
    assert outbox(saga_engine) == [("join", "step", 1)]
    join = next(s for s in saga_engine.get_run(run_id)["steps"] if s["step"] == "join")
    assert (join["state"], join["pending_deps"], join["attempt"]) == ("ready", 0, 1)


def test_a_transient_failure_schedules_a_durable_retry_through_the_outbox(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    claim(saga_engine, run_id, "a")
    with saga_engine.engine.begin() as conn:
        outcome = saga_engine.lifecycle.fail_attempt_in_tx(
            conn, AttemptRef(run_id, "step", "a", 1), {"message": "503"}, 60.0
        )
    assert outcome == "retry_scheduled"
    assert outbox(saga_engine) == [("a", "step", 2)]
    assert (
        count(
            saga_engine,
            "SELECT count(*) FROM saga.outbox WHERE available_at > now() + interval '50 seconds'",
        )
        == 1
    ), "the retry is due later, and the due time is stored"
    a = next(s for s in saga_engine.get_run(run_id)["steps"] if s["step"] == "a")
    assert (a["state"], a["attempt"], a["error"]) == ("ready", 2, {"message": "503"})
    assert claim(saga_engine, run_id, "a", attempt=1) is None, "the old attempt is stale"


def test_a_permanent_failure_with_nothing_to_undo_ends_the_run_failed(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    claim(saga_engine, run_id, "a")
    with saga_engine.engine.begin() as conn:
        outcome = saga_engine.lifecycle.fail_attempt_in_tx(
            conn, AttemptRef(run_id, "step", "a", 1), {"message": "declined"}, None
        )
    assert outcome == "failed"
    run = saga_engine.get_run(run_id)
    assert run["state"] == "failed"
    assert run["error"]["step"] == "a" and run["error"]["message"] == "declined"
    assert {s["step"]: s["state"] for s in run["steps"]} == {
        "a": "failed",
        "b": "skipped",
        "c": "skipped",
    }
    assert outbox(saga_engine) == []


def test_the_database_refuses_an_unknown_state(saga_engine: Saga) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    with pytest.raises(Exception, match="ck_runs_state"), saga_engine.engine.begin() as conn:
        conn.execute(text("UPDATE saga.runs SET state = 'bogus' WHERE id = :r"), {"r": run_id})


def test_the_history_is_append_only(saga_engine: Saga) -> None:
    saga_engine.start_now("it.linear", {})
    with pytest.raises(Exception, match="append-only"), saga_engine.engine.begin() as conn:
        conn.execute(text("UPDATE saga.history SET event = 'run_completed'"))


def test_a_worker_with_another_definition_sends_the_message_back_and_runs_nothing(
    saga_engine: Saga, db_url: str
) -> None:
    from saga import Registry, Workflow
    from saga.executor import Executor

    run_id = saga_engine.start_now("it.linear", {}).run_id
    changed = Workflow("it.linear")  # same name and version, another graph
    changed.add_step("a", lambda ctx: "other code")
    other = Saga(Registry(changed), engine=saga_engine.engine)
    body = {
        "run_id": run_id,
        "workflow": "it.linear",
        "version": 1,
        "kind": "step",
        "step": "a",
        "attempt": 1,
    }
    assert Executor(other).execute(body) == "deferred"
    run = saga_engine.get_run(run_id)
    assert run["state"] == "running"
    a = next(s for s in run["steps"] if s["step"] == "a")
    assert (a["state"], a["result"]) == ("ready", None), "the changed code did not run"
    with saga_engine.engine.connect() as conn:
        row = conn.execute(
            text("SELECT deferrals, published_at, available_at > now() FROM saga.outbox")
        ).one()
    assert (row[0], row[1], row[2]) == (1, None, True), "back to the relay, a little later"
    # A worker with the run's definition runs it.
    assert Executor(saga_engine).execute(body) == "completed"


def test_a_worker_without_the_runs_version_sends_the_message_back(saga_engine: Saga) -> None:
    from saga.executor import Executor

    run_id = saga_engine.start_now("it.linear", {}).run_id
    body = {"run_id": run_id, "workflow": "it.linear", "version": 7, "kind": "step",
            "step": "a", "attempt": 1}
    assert Executor(saga_engine).execute(body) == "deferred"
    body |= {"version": 1, "definition": "0" * 16}  # this version, but another graph
    assert Executor(saga_engine).execute(body) == "deferred"
    assert saga_engine.get_run(run_id)["state"] == "running"
    with saga_engine.engine.connect() as conn:
        assert conn.execute(text("SELECT deferrals FROM saga.outbox")).scalar() == 2
    body["attempt"] = 2  # no such message was ever sent
    assert Executor(saga_engine).execute(body) == "duplicate"


def test_a_business_key_that_looks_like_a_uuid_still_finds_its_run(saga_engine: Saga) -> None:
    key = "6f1c2a9e-8d4b-4f7a-9c1e-2b3d4e5f6a7b"
    run_id = saga_engine.start_now("it.linear", {}, key=key).run_id
    assert run_id != key
    assert str(saga_engine.get_run(key)["id"]) == run_id
    assert str(saga_engine.get_run(run_id)["id"]) == run_id


class _Recording:
    def __init__(self, fail: bool = False) -> None:
        self.fail = fail
        self.sent: list[dict[str, Any]] = []

    def publish(self, envelope: Any) -> None:
        if self.fail:
            raise ConnectionError("broker down")
        self.sent.append(envelope.message.as_body())


def test_with_eager_dispatch_a_worker_publishes_what_its_completion_made_ready(
    saga_engine: Saga,
) -> None:
    from saga.executor import Executor

    recording = _Recording()
    executor = Executor(saga_engine, publisher=lambda: recording)
    run_id = saga_engine.start_now("it.diamond", {}).run_id
    with saga_engine.engine.begin() as conn:  # the relay's part for the first step
        conn.execute(text("UPDATE saga.outbox SET published_at = now()"))
    body = {"run_id": run_id, "workflow": "it.diamond", "version": 1, "kind": "step",
            "step": "a", "attempt": 1}
    assert executor.execute(body) == "completed"
    assert sorted(m["step"] for m in recording.sent) == ["b", "c"]
    assert count(saga_engine, "SELECT count(*) FROM saga.outbox WHERE published_at IS NULL") == 0


def test_when_an_eager_publish_fails_the_relay_gets_the_messages_back(saga_engine: Saga) -> None:
    from saga.executor import Executor

    executor = Executor(saga_engine, publisher=lambda: _Recording(fail=True))
    run_id = saga_engine.start_now("it.diamond", {}).run_id
    with saga_engine.engine.begin() as conn:
        conn.execute(text("UPDATE saga.outbox SET published_at = now()"))
    body = {"run_id": run_id, "workflow": "it.diamond", "version": 1, "kind": "step",
            "step": "a", "attempt": 1}
    assert executor.execute(body) == "completed"
    with saga_engine.engine.connect() as conn:
        rows = conn.execute(
            text("SELECT step FROM saga.outbox WHERE published_at IS NULL ORDER BY step")
        ).scalars().all()
    assert rows == ["b", "c"]
