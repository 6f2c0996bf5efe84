"""In-process chaining, driven in-process on the real PostgreSQL: a worker that completes a step
and so makes ready a step of the same run on a queue it consumes claims it in the same
transaction and runs it at once, without a broker round trip or an outbox row."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import text

from saga import Saga, Settings
from saga.executor import Executor


class Recording:
    """A publisher that keeps what it was asked to publish."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []

    def publish(self, envelope: Any) -> None:
        self.sent.append(envelope.message.as_body())


def first_message(saga: Saga, run_id: str) -> dict[str, Any]:
    with saga.engine.begin() as conn:  # the relay's part
        row = conn.execute(
            text(
                "UPDATE saga.outbox o SET published_at = now() FROM saga.runs r "
                "WHERE r.id = o.run_id AND o.run_id = :r "
                "RETURNING o.run_id::text, r.workflow, r.version, o.kind, o.step, o.attempt"
            ),
            {"r": run_id},
        ).one()
    keys = ("run_id", "workflow", "version", "kind", "step", "attempt")
    return dict(zip(keys, row, strict=True))


def executor(saga: Saga, queues: set[str], recording: Recording) -> Executor:
    return Executor(saga, publisher=lambda: recording, queues=lambda: queues)


def outbox_inserts(saga: Saga) -> int:
    with saga.engine.connect() as conn:
        return int(conn.execute(text("SELECT count(*) FROM saga.outbox_log")).scalar_one())


def log_outbox_inserts(saga: Saga) -> None:
    with saga.engine.begin() as conn:
        conn.execute(text(
            "CREATE TABLE saga.outbox_log (step text);"
            "CREATE FUNCTION saga.log_outbox() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
            "INSERT INTO saga.outbox_log VALUES (NEW.step); RETURN NEW; END $$;"
            "CREATE TRIGGER log_outbox AFTER INSERT ON saga.outbox FOR EACH ROW "
            "EXECUTE FUNCTION saga.log_outbox();"
        ))


def test_one_delivery_runs_a_linear_run_to_the_end_without_publishing_or_queuing(
    saga_engine: Saga,
) -> None:
    log_outbox_inserts(saga_engine)
    recording = Recording()
    run_id = saga_engine.start_now("it.linear", {}).run_id
    message = first_message(saga_engine, run_id)

    assert executor(saga_engine, {"saga"}, recording).execute(message) == "completed"

    run = saga_engine.get_run(run_id)
    assert (run["state"], run["result"]) == ("completed", {"c": 3})
    assert recording.sent == []
    assert outbox_inserts(saga_engine) == 1, "only the first step's, written at start"
    # b and c were claimed by the same process, each under a claim token of its own.
    workers = {s["step"]: s["worker"] for s in run["steps"]}
    assert len(set(workers.values())) == 3
    assert len({w.rsplit(":", 1)[0] for w in workers.values()}) == 1


def test_a_chain_stops_at_its_budget_and_the_next_step_goes_out(saga_engine: Saga) -> None:
    engine = Saga(saga_engine.registry, engine=saga_engine.engine,
                  settings=Settings(chain_steps=2))
    recording = Recording()
    run_id = engine.start_now("it.linear", {}).run_id

    assert executor(engine, {"saga"}, recording).execute(first_message(engine, run_id)) == (
        "completed"
    )
    assert [m["step"] for m in recording.sent] == ["c"]
    assert {s["step"]: s["state"] for s in engine.get_run(run_id)["steps"]} == {
        "a": "completed", "b": "completed", "c": "ready",
    }


def test_a_fan_out_chains_one_branch_publishes_the_other_and_the_join_chains_last(
    saga_engine: Saga,
) -> None:
    recording = Recording()
    worker = executor(saga_engine, {"saga"}, recording)
    run_id = saga_engine.start_now("it.diamond", {}).run_id

    assert worker.execute(first_message(saga_engine, run_id)) == "completed"
    assert [m["step"] for m in recording.sent] == ["c"]
    states = {s["step"]: s["state"] for s in saga_engine.get_run(run_id)["steps"]}
    assert states == {"a": "completed", "b": "completed", "c": "ready", "d": "waiting"}

    assert worker.execute(recording.sent.pop()) == "completed"  # c, then the join d
    run = saga_engine.get_run(run_id)
    assert (run["state"], run["result"]) == ("completed", {"d": "abac"})
    assert recording.sent == []


def test_a_step_on_a_queue_this_worker_does_not_consume_is_published_not_chained(
    saga_engine: Saga,
) -> None:
    recording = Recording()
    run_id = saga_engine.start_now("it.linear", {}).run_id

    worker = executor(saga_engine, {"payments"}, recording)
    assert worker.execute(first_message(saga_engine, run_id)) == "completed"
    assert [m["step"] for m in recording.sent] == ["b"]


def test_a_step_that_could_outlast_the_deliverys_hard_time_limit_is_not_chained(
    saga_engine: Saga,
) -> None:
    recording = Recording()
    run_id = saga_engine.start_now("it.linear", {}).run_id

    worker = executor(saga_engine, {"saga"}, recording)
    # The transport kills this delivery in 10 s; b may run for 300 s.
    outcome = worker.execute(first_message(saga_engine, run_id), deadline=time.monotonic() + 10)
    assert outcome == "completed"
    assert [m["step"] for m in recording.sent] == ["b"]
