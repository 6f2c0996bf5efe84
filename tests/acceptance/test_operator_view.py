"""Stall detection with real processes: workers and relays register themselves, and
``saga status --check`` exits with a warning's code when a queue has no consumer, no relay is
live, runs wait for a definition no worker has, or the outbox stops draining. The relay serves
``/metrics``."""

from __future__ import annotations

import json
import socket
import subprocess
from typing import Any

import httpx
import pytest

from saga import Workflow
from tests.acceptance.conftest import BIN, REPO, RedisServer, System
from tests.support.waiting import wait_until

pytestmark = pytest.mark.slow

FAST = {"SAGA_BEAT_INTERVAL": "0.5"}


def check(system: System, *extra: str, stale_after: float = 3) -> tuple[int, dict[str, Any]]:
    """``saga status --check --json`` as a subprocess: its exit code and document."""
    proc = subprocess.run(
        [str(BIN / "saga"), "status", "--check", "--json", "--stale-after", str(stale_after),
         *extra],
        env={"SAGA_DATABASE_URL": system.db_url, "PATH": str(BIN)},
        capture_output=True, text=True, timeout=60, check=False, cwd=REPO,
    )
    assert proc.stdout, proc.stderr
    return proc.returncode, json.loads(proc.stdout)


def codes(doc: dict[str, Any]) -> set[str]:
    return {w["code"] for w in doc["warnings"]}


def start_worker_on(system: System, name: str, queue: str) -> None:
    argv = [str(BIN / "celery"), "-A", "tests.apps.flows", "worker", "-Q", queue, "-c", "1",
            "--loglevel=INFO", "-n", f"{name}-{system.queue}@%h", "--without-gossip",
            "--without-mingle", "--without-heartbeat"]
    system.supervisor.start(name, argv, env=system.env, cwd=REPO)
    system.wait_ready(name)


def test_a_queue_nobody_consumes_is_a_warning_until_a_worker_for_it_starts(
    system: System,
) -> None:
    system.env.update(FAST)
    system.start_relay()
    start_worker_on(system, "elsewhere", "some_other_queue")
    run_ids = system.start_runs("test.linear", {}, count=2)

    def stalled() -> tuple[int, dict[str, Any]] | None:
        code, doc = check(system)
        return (code, doc) if "queue_without_consumer" in codes(doc) else None

    code, doc = wait_until(stalled, timeout=30, interval=0.5, message="no queue warning")
    assert code == 11
    warning = next(w for w in doc["warnings"] if w["code"] == "queue_without_consumer")
    assert warning["queue"] == system.queue
    worker = next(p for p in doc["processes"] if p["kind"] == "worker")
    assert worker["queues"] == ["some_other_queue"] and worker["live"]
    assert any(d["name"] == "test.linear" for d in worker["definitions"])

    system.start_worker()
    system.wait_finished(run_ids)
    assert wait_until(lambda: check(system)[0] == 0, timeout=30, interval=0.5,
                      message="the warning did not clear")


def test_a_stopped_or_killed_relay_is_a_warning_and_the_relay_serves_metrics(
    system: System,
) -> None:
    system.env.update(FAST)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [str(BIN / "saga"), "relay", "--app", "tests.apps.flows:app", "--metrics-port",
            str(port)]
    # The console script does not put the working directory on sys.path.
    env = {**system.env, "PYTHONPATH": str(REPO)}
    system.supervisor.start("relay", argv, env=env, cwd=REPO)
    assert wait_until(lambda: check(system)[0] == 0, timeout=30, interval=0.5,
                      message="the relay did not register")
    system.start_runs("test.linear", {})

    def scraped() -> str | None:
        try:
            body = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
        except httpx.HTTPError:
            return None
        return body if "saga_runs" in body and "saga_outbox" in body else None

    body = wait_until(scraped, timeout=30, interval=0.5, message="no metrics")
    assert 'saga_state="running"' in body

    system.supervisor.stop("relay")
    code, doc = check(system)
    assert code == 10
    assert "no relay seen" in doc["warnings"][0]["message"]
    assert "none registered" in doc["warnings"][0]["message"]

    system.start_relay("relay2")
    assert wait_until(lambda: "no_relay" not in codes(check(system)[1]), timeout=30,
                      interval=0.5, message="the second relay did not register")
    system.supervisor.kill("relay2", restart=False)
    code, doc = wait_until(
        lambda: (r := check(system))[0] == 10 and r, timeout=30, interval=0.5,
        message="a killed relay was not noticed",
    )
    assert "last seen" in doc["warnings"][0]["message"]


def test_runs_waiting_for_a_definition_no_live_worker_has_are_a_warning(
    system: System,
) -> None:
    system.env.update(FAST)
    # The test process knows a workflow the workers do not: its runs wait.
    extra = Workflow("test.unknown_to_workers", queue=system.queue)
    extra.add_step("only", lambda ctx: None)
    system.engine.registry.register(extra)
    system.start_relay()
    system.start_worker()
    system.start_runs("test.unknown_to_workers", {})

    _, doc = wait_until(
        lambda: (r := check(system))[0] == 12 and r, timeout=30, interval=0.5,
        message="no definition warning",
    )
    warning = doc["warnings"][0]
    assert warning["workflow"] == "test.unknown_to_workers"
    assert warning["definition_hash"] == extra.definition_hash


def test_an_outbox_that_stops_draining_is_a_warning(
    system: System, redis_server: RedisServer
) -> None:
    system.env.update(FAST)
    system.start_relay()
    with redis_server.outage():
        system.start_runs("test.linear", {})
        code, doc = wait_until(
            # A publish to the missing broker blocks for its timeout (5 s) between beats.
            lambda: (r := check(system, "--outbox-age", "1", stale_after=15))
            and "outbox_stale" in codes(r[1]) and r,
            timeout=40, interval=0.5, message="no outbox warning",
        )
        assert "no_relay" not in codes(doc)  # the relay is alive, backing off
        assert code == 11  # no worker consumes the queue either: the first warning's code
