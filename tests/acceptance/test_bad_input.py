"""Hostile input on a real system: whatever arrives on a saga queue is logged in one line and
dropped (or dead-lettered) while the worker keeps its processes; a step whose result or error
PostgreSQL cannot store fails its attempt at once with a clear stored error."""

from __future__ import annotations

import contextlib
import json
from collections import Counter
from dataclasses import dataclass
from typing import Any

import pytest
import redis
from kombu import Connection, Exchange, Producer, Queue

from tests.acceptance.conftest import System
from tests.support.procs import child_pids
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

LINEAR_STEPS = ("first", "second", "third")
FORGED = "first\n[2026-01-01 00:00:00,000: CRITICAL/MainProcess] FAKE: database dropped"
MISSING_RUN = "00000000-0000-4000-8000-000000000011"
EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


@dataclass(frozen=True)
class Hostile:
    """One message to publish, and a fragment of the one line the worker must log for it."""

    name: str
    body: str | bytes
    headers: dict[str, Any]
    expect: str
    content_type: str = "application/json"
    tagged: bool = True
    """Whether that line names the message's task id (``task_id=hostile-<name>``)."""

    @property
    def task_id(self) -> str:
        return f"hostile-{self.name}"


def task_headers(task_id: str, **changes: Any) -> dict[str, Any]:
    """Protocol 2 headers as Celery writes them for ``saga.execute``."""
    headers = {
        "lang": "py", "task": "saga.execute", "id": task_id, "shadow": None, "eta": None,
        "expires": None, "group": None, "group_index": None, "retries": 0,
        "timelimit": [None, None], "root_id": task_id, "parent_id": None, "argsrepr": "()",
        "kwargsrepr": "{}", "origin": "hostile@test", "ignore_result": True,
    }
    return {**headers, **changes}


def step_kwargs(run_id: str, **changes: Any) -> dict[str, Any]:
    """The kwargs of a step message for ``test.linear``'s first step."""
    return {"run_id": run_id, "workflow": "test.linear", "version": 1, "kind": "step",
            "step": "first", "attempt": 1, **changes}


def task(name: str, expect: str, kwargs: dict[str, Any], args: list[Any] | None = None) -> Hostile:
    """A well-formed Celery message whose arguments are not a valid step message (the pool
    process parses and drops it)."""
    body = json.dumps([args or [], kwargs, EMBED])
    return Hostile(name, body, task_headers(f"hostile-{name}"), expect, tagged=False)


def raw(name: str, expect: str, body: str | bytes, **options: Any) -> Hostile:
    """A message for saga.execute with ``body``; ``headers=`` replaces the usual headers."""
    headers = options.pop("headers", None)
    if headers is None:
        headers = task_headers(f"hostile-{name}", **options.pop("header_changes", {}))
    return Hostile(name, body, headers, expect, **options)


def hostile_messages(run_id: str) -> list[Hostile]:
    """Every kind of bad message, most of them about the existing run ``run_id``."""
    args_ok = json.dumps([[], step_kwargs(run_id), EMBED])
    return [
        # Celery messages whose arguments are not a step message (dropped in the pool).
        task("unknown-fields", "dropped a malformed step message: unknown fields ['bogus']",
             {"bogus": 1}),
        task("positional-args", "dropped a step message with positional args", {}, [1, 2]),
        task("bad-run-id", "run_id is not a UUID", step_kwargs("not-a-uuid")),
        task("huge-attempt", "attempt must be an int from 1 to 2147483647",
             step_kwargs(run_id, attempt=10**30)),
        task("forged-step", "dropped a message for an unknown step",
             step_kwargs(run_id, step=FORGED)),
        task("stale", f"dropped a stale or duplicate message run_id={run_id}",
             step_kwargs(run_id)),
        # A workflow this worker lacks goes back to the outbox; for no run at all, nothing.
        task("unknown-workflow",
             f"dropped a stale or duplicate message run_id={MISSING_RUN} workflow=test.nope",
             step_kwargs(MISSING_RUN, workflow="test.nope")),
        # Bodies that are not Celery's [args, kwargs, embed] (dropped in the main process).
        raw("hello", "the body is a dict, not [args, kwargs, embed]", '{"hello": 1}'),
        raw("hello-no-id",
            "the id header is missing or not a string of 1-200 characters "
            "content_type=application/json size=12", '{"hello": 1}',
            headers={"task": "saga.execute"}, tagged=False),
        raw("empty", "not [args, kwargs, embed]", ""),
        raw("ten-mib", "over the limit of 65536",
            json.dumps([[], {"blob": "x" * (10 * 2**20)}, EMBED])),
        raw("unknown-content-type", "content type 'application/x-foo' is not accepted",
            "zzz", content_type="application/x-foo"),
        raw("pickle", "content type 'application/x-python-serialize' is not accepted",
            b"\x80\x04\x95\x05\x00\x00\x00\x00\x00\x00\x00]\x94.",
            content_type="application/x-python-serialize"),
        raw("not-json", "the body does not decode", b"{not json"),
        raw("arity-2", "the body is a list of 2 items", "[[], {}]"),
        raw("arity-4", "the body is a list of 4 items", "[[], {}, {}, 1]"),
        raw("wrong-types", "args is a int, not a list", "[1, 2, 3]"),
        raw("deep-body", "nested more than 4 levels deep at body[1]['run_id']",
            '[[], {"run_id": ' + "[" * 900 + "]" * 900 + "}, {}]"),
        raw("callbacks", "carries no callbacks",
            json.dumps([[], step_kwargs(run_id), {**EMBED, "callbacks": [{"task": "x"}]}])),
        raw("protocol-1", "a protocol 1 message",
            json.dumps({"task": "saga.execute", "id": "p1", "args": [], "kwargs": {}}),
            headers={}, tagged=False),
        # Headers of the wrong type or content.
        raw("id-object", "not a string of 1-200 characters content_type=application/json "
            f"size={len(args_ok)} task_id={{'a': 1}}", args_ok,
            headers=task_headers("x", id={"a": 1}), tagged=False),
        raw("timelimit-text", "header 'timelimit' is not a pair of numbers", args_ok,
            header_changes={"timelimit": "abc"}),
        raw("timelimit-strings", "header 'timelimit' is not a pair of numbers", args_ok,
            header_changes={"timelimit": ["a", "b"]}),
        raw("eta-number", "header 'eta' is a int, not a string", args_ok,
            header_changes={"eta": 5}),
        raw("eta-text", "invalid ETA value 'soon'", args_ok, header_changes={"eta": "soon"}),
        raw("retries-text", "header 'retries' is not an integer", args_ok,
            header_changes={"retries": "x"}),
        raw("header-newline", "header 'kwargsrepr' is too long or holds control characters",
            args_ok, header_changes={"kwargsrepr": FORGED}),
        # Not for saga.execute: Celery's own handling, which keeps the worker alive too.
        raw("no-headers-text", "Refusing to deserialize untrusted content of type text/plain",
            "hello, worker", headers={}, content_type="text/plain", tagged=False),
        raw("no-headers-json", "Received and deleted unknown message",
            json.dumps({"run_id": run_id}), headers={}, tagged=False),
        raw("task-number", "Received unregistered task of type 5", "[[], {}, {}]",
            headers={"task": 5, "id": "hostile-task-number"}, tagged=False),
    ]


def snapshot(system: System, run_id: str) -> dict[str, Any]:
    """What must not change: the run's state, its steps' states and attempts, its history."""
    run = system.run(run_id)
    return {
        "state": run["state"],
        "steps": sorted((s["kind"], s["step"], s["state"], s["attempt"]) for s in run["steps"]),
        "history": [h["event"] for h in run["history"]],
    }


def publish(system: System, messages: list[Hostile]) -> None:
    """Put each message on the test's queue as it is (to the exchange the worker declared)."""
    with Connection(system.broker_url) as conn:
        producer = Producer(conn.default_channel)
        for m in messages:
            producer.publish(
                m.body,
                exchange=system.queue,
                routing_key=system.queue,
                content_type=m.content_type,
                content_encoding="binary" if isinstance(m.body, bytes) else "utf-8",
                headers=m.headers,
                retry=True,
            )


@contextlib.contextmanager
def dead_letter_queue(system: System) -> Any:
    """On RabbitMQ, a dead-letter exchange and queue for the test's queue (the worker declares
    its queue with that exchange); yields the dead-letter queue's name, or None on Redis."""
    if system.broker != "rabbitmq":
        yield None
        return
    exchange = Exchange(f"{system.queue}.dlx", type="fanout")
    dead = Queue(f"{system.queue}.dead", exchange)
    with Connection(system.broker_url) as conn:
        dead(conn.default_channel).declare()
    system.env["SAGA_TEST_DEAD_LETTER_EXCHANGE"] = exchange.name
    try:
        yield dead.name
    finally:
        with contextlib.suppress(Exception), Connection(system.broker_url) as conn:
            conn.default_channel.queue_delete(dead.name)
            conn.default_channel.exchange_delete(exchange.name)


def dead_lettered_ids(system: System, queue: str) -> set[str]:
    """The task ids of the messages in the dead-letter queue (consumed)."""
    ids: set[str] = set()
    with Connection(system.broker_url) as conn:
        q = Queue(queue, channel=conn.default_channel)
        while (message := q.get(no_ack=True)) is not None:
            ids.add(str((message.headers or {}).get("id")))
    return ids


def logged(log: str, m: Hostile) -> bool:
    """Whether one line of the worker's log reports ``m``."""
    return any(
        m.expect in line and (not m.tagged or f"task_id={m.task_id}" in line)
        for line in log.splitlines()
    )


@pytest.mark.parametrize("broker", ["redis", "rabbitmq"])
def test_hostile_messages_are_logged_and_dropped_and_the_worker_keeps_its_processes(
    system: System,
) -> None:
    with dead_letter_queue(system) as dead:
        system.start_worker()
        system.start_relay()
        [kept] = system.start_runs("test.linear", {})
        assert system.wait_finished([kept])[kept] == "completed"
        before = snapshot(system, kept)
        main = system.supervisor.pid("worker")
        assert main is not None
        pool = wait_until(lambda: child_pids(main), message="the worker has no pool")
        messages = hostile_messages(kept)

        publish(system, messages)

        wait_until(
            lambda: [m.name for m in messages if not logged(system.supervisor.log("worker"), m)]
            == [],
            timeout=60,
            message="not every hostile message was logged",
        )
        # The same worker goes on serving: a run started now completes, each step once.
        [after] = system.start_runs("test.linear", {})
        assert system.wait_finished([after])[after] == "completed"
        counts = Counter(e["step"] for e in system.executions([after]))
        assert counts == Counter(dict.fromkeys(LINEAR_STEPS, 1))

        assert system.supervisor.pid("worker") == main
        assert system.supervisor.restarts("worker") == 0
        assert child_pids(main) == pool
        assert snapshot(system, kept) == before
        log = system.supervisor.log("worker")
        assert "Unrecoverable error" not in log
        assert "Connection to broker lost" not in log
        assert not any(line.startswith("[2026-01-01 00:00:00,000") for line in log.splitlines())
        assert "step=first\\n[2026-01-01 00:00:00,000: CRITICAL/MainProcess] FAKE" in log
        assert max(len(line) for line in log.splitlines()) < 10_000

        # Rejected without requeue: dead-lettered on RabbitMQ, gone for good on Redis.
        rejected = {m.task_id for m in messages if m.tagged}
        if dead is not None:
            seen: set[str] = set()
            wait_until(
                lambda: seen.update(dead_lettered_ids(system, dead)) or rejected <= seen,
                timeout=30,
                message="the rejected messages did not reach the dead-letter queue",
            )
        else:
            client = redis.Redis.from_url(system.broker_url)
            try:
                assert client.llen(system.queue) == 0
                assert [v for v in client.hvals("unacked") if b"hostile-" in v] == []
            finally:
                client.close()


STORAGE_CASES = [
    # (poison, attempts, stored message, whether the outcome is unknown)
    ("nul_result", 1, "the step's result is not storable: NUL byte at result['s']", True),
    ("nul_error", 3, "badbyte", False),
    ("unprintable_error", 3, "UnprintableError (its __str__ raised RuntimeError)", False),
    ("huge_error", 3, "x" * 1997 + "...", False),
]


@pytest.mark.parametrize(("poison", "attempts", "message", "unknown"), STORAGE_CASES)
def test_a_result_or_error_that_cannot_be_stored_fails_the_attempt_at_once(
    system: System, poison: str, attempts: int, message: str, unknown: bool
) -> None:
    system.start_worker()
    system.start_relay()

    [run_id] = system.start_runs("test.linear", {"poison": {"first": poison}})
    assert system.wait_finished([run_id])[run_id] == "failed"

    run = system.run(run_id)
    [first] = [s for s in run["steps"] if s["kind"] == "step" and s["step"] == "first"]
    assert first["state"] == "failed"
    assert first["attempt"] == attempts
    assert first["error"]["message"] == message
    assert first["error"]["attempt"] == attempts
    assert ("outcome" in first["error"]) is unknown
    if unknown:
        assert first["error"]["outcome"] == "unknown"
    # Each attempt failed as soon as it ran: none was left running until its lease expired.
    assert "lease_expired" not in [h["event"] for h in run["history"]]
    ran = [e["attempt"] for e in system.executions([run_id]) if e["step"] == "first"]
    assert ran == list(range(1, attempts + 1))
    log = system.supervisor.log("worker")
    assert max(len(line) for line in log.splitlines()) < 5_000
    assert "attempt failed: " in log
