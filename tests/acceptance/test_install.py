"""``saga.install`` touches only saga: its own task carries saga's options, the app's settings
and its other tasks stay as they were (down to the messages on a real Redis), and a worker that
serves saga's queues without the settings saga wants says so in one warning line."""

from __future__ import annotations

import json
import secrets
import sys
import uuid
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from celery import Celery

import saga
from saga.celery_adapter import CeleryPublisher, engine_of, worker_warning
from saga.messages import Envelope, StepMessage
from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
USER_SETTINGS: dict[str, Any] = {
    "task_serializer": "pickle",
    "accept_content": ["json", "pickle"],
    "task_acks_late": False,
    "task_ignore_result": False,
    "worker_prefetch_multiplier": 4,
}
"""A user's own choices, none of them saga's."""


def user_app(broker: str) -> tuple[Celery, Any]:
    app = Celery("user-app", broker=broker)
    app.conf.update(USER_SETTINGS)

    @app.task(name="user.plain")  # type: ignore[untyped-decorator]
    def plain(x: int) -> int:
        return x

    return app, plain


@pytest.fixture
def engine() -> Iterator[saga.Saga]:
    wf = saga.Workflow("install.flow")
    wf.add_step("only", lambda ctx: None)
    # No statement runs here: install() and publishing need the engine, not its database.
    eng = saga.Saga(saga.Registry(wf), database_url="postgresql://127.0.0.1/saga_install_none")
    try:
        yield eng
    finally:
        eng.engine.dispose()


def test_install_changes_no_setting_of_the_app_nor_of_its_other_tasks(
    engine: saga.Saga, redis_url: str
) -> None:
    app, plain = user_app(redis_url)
    before = dict(app.conf)

    saga.install(app, engine)

    assert dict(app.conf) == before
    plain_task = app.tasks["user.plain"]
    assert (plain_task.serializer, plain_task.acks_late, plain_task.ignore_result) == (
        "pickle", False, False,
    )
    ours = app.tasks["saga.execute"]
    assert (ours.serializer, ours.acks_late, ours.ignore_result, ours.reject_on_worker_lost) == (
        "json", True, True, True,
    )

    # On the broker: the user's task goes out in the app's serializer, saga's message in JSON.
    queue = f"install_{secrets.token_hex(4)}"
    plain.apply_async((1,), queue=queue)
    message = StepMessage(str(uuid.uuid4()), "install.flow", 1, "step", "only", 1)
    publisher = CeleryPublisher(app)
    try:
        publisher.publish(Envelope(message, queue))
    finally:
        publisher.close()
    # Read the raw messages (the Redis transport keeps each one as JSON in the queue's list):
    # nothing is deserialized here.
    client = redis.Redis.from_url(redis_url)
    try:
        wait_until(
            lambda: client.llen(queue) == 2, timeout=10, message="two messages in the queue"
        )
        raw = client.lrange(queue, 0, -1)
    finally:
        client.close()
    got = {json.loads(m)["headers"]["task"]: json.loads(m)["content-type"] for m in raw}
    assert got == {
        "user.plain": "application/x-python-serialize",
        "saga.execute": "application/json",
    }
    # What tools like Flower show of saga's message is the step it names (saga gives the
    # reprs: Celery's own saferepr of the arguments is a quarter of a publish's CPU).
    [ours] = [json.loads(m)["headers"] for m in raw if b"saga.execute" in m]
    assert ours["argsrepr"] == "()"
    assert ours["kwargsrepr"] == f"{{run_id={message.run_id} kind=step step=only attempt=1}}"


def test_two_apps_in_one_process_each_run_saga_with_their_own_engine(engine: saga.Saga) -> None:
    other = saga.Saga(saga.Registry(), database_url="postgresql://127.0.0.1/saga_install_other")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # Celery warns when a task name is taken
            first, second = Celery("first", broker="memory://"), Celery("second", broker="memory://")
            saga.install(first, engine)
            saga.install(second, other)
            ours, theirs = first.tasks["saga.execute"], second.tasks["saga.execute"]
        assert ours.run is not theirs.run
        assert engine_of(first) is engine and engine_of(second) is other
    finally:
        other.engine.dispose()


def test_the_worker_warning_names_each_setting_saga_wants_and_only_for_its_queues() -> None:
    wanted = {
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "accept_content": ["json"],
    }
    assert worker_warning(wanted, set(), {"saga"}) is None
    assert worker_warning({**wanted, "worker_prefetch_multiplier": 4}, {"emails"}, {"saga"}) is None

    line = worker_warning(
        {**USER_SETTINGS, "worker_cancel_long_running_tasks_on_connection_loss": False},
        {"saga", "emails"},
        {"saga", "payments"},
    )
    assert line is not None and "\n" not in line
    assert line.startswith("saga: this worker serves saga queues saga with ")
    assert "worker_prefetch_multiplier=4 (saga wants 1)" in line
    assert "worker_cancel_long_running_tasks_on_connection_loss=False (saga wants True)" in line
    assert "accept_content includes 'pickle'" in line


APP_MODULE = '''
import os
from celery import Celery
import saga

wf = saga.Workflow("install.flow", queue=os.environ["SAGA_TEST_QUEUE"])
wf.add_step("only", lambda ctx: None)
engine = saga.Saga(saga.Registry(wf), database_url=os.environ["SAGA_DATABASE_URL"])
app = Celery("user-app", broker=os.environ["SAGA_BROKER_URL"])
app.conf.update(broker_connection_retry_on_startup=True)
if os.environ.get("CANCEL_ON_LOSS"):
    app.conf.worker_cancel_long_running_tasks_on_connection_loss = True
saga.install(app, engine)
'''


@pytest.mark.slow
def test_a_worker_without_the_settings_saga_wants_warns_once_at_start_and_one_with_them_not(
    tmp_path: Path, redis_url: str, db_url: str, supervisor: Supervisor
) -> None:
    (tmp_path / "user_tasks.py").write_text(APP_MODULE)
    queue = f"install_{secrets.token_hex(4)}"
    env = {
        "PYTHONPATH": f"{tmp_path}:{REPO}",
        "SAGA_DATABASE_URL": db_url,
        "SAGA_BROKER_URL": redis_url,
        "SAGA_TEST_QUEUE": queue,
    }

    def worker(name: str, *extra: str) -> str:
        argv = [
            str(BIN / "celery"), "-A", "user_tasks", "worker", "-Q", queue, "-c", "1",
            "-n", f"{name}@%h", "--without-gossip", "--without-mingle", "--without-heartbeat",
            "--loglevel=INFO", *extra,
        ]
        supervisor.start(name, argv, env=env, cwd=tmp_path)
        wait_until(
            lambda: " ready." in supervisor.log(name), timeout=60, message=f"{name} not ready"
        )
        return supervisor.log(name)

    log = worker("defaults")
    warnings = [ln for ln in log.splitlines() if "saga: this worker serves saga queues" in ln]
    assert len(warnings) == 1, log
    assert f"queues {queue} with" in warnings[0]
    assert "worker_prefetch_multiplier=4 (saga wants 1)" in warnings[0]
    assert "worker_cancel_long_running_tasks_on_connection_loss=False" in warnings[0]

    # The setting on the app, the prefetch multiplier as the worker's option: no warning.
    env["CANCEL_ON_LOSS"] = "1"
    settled = worker("settled", "--prefetch-multiplier=1")
    assert "saga: this worker serves saga queues" not in settled, settled
