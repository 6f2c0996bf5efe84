"""Everything saga does with Celery, behind one module.

:func:`install` wires an engine into the user's own Celery app (no global app): safe settings
made explicit, and one task, ``saga.execute``, that runs step messages. :class:`CeleryPublisher`
is how the relay puts messages on the broker.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery, signals

from saga import logs, telemetry
from saga.app import Saga
from saga.context import JSON
from saga.errors import SagaError
from saga.executor import Executor
from saga.messages import Envelope
from saga.presence import Presence, beat_in_thread

log = logging.getLogger("saga.celery")
TASK_NAME = "saga.execute"
HARD_LIMIT_GRACE = 5.0
_TASK_ID_NS = uuid.UUID("5a9a0000-0000-4000-8000-00000000a9a5")
_ENGINES: weakref.WeakKeyDictionary[Celery, Saga] = weakref.WeakKeyDictionary()

SAFE_SETTINGS: dict[str, Any] = {
    "task_serializer": "json",
    "result_serializer": "json",
    "accept_content": ["json"],
    "result_accept_content": ["json"],
    "task_acks_late": True,
    # A lost worker's step comes back through its lease, not through a redelivery loop.
    "task_reject_on_worker_lost": False,
    "worker_prefetch_multiplier": 1,
    "task_ignore_result": True,
    "broker_connection_retry_on_startup": True,
    "worker_cancel_long_running_tasks_on_connection_loss": True,
}


class _TaskCaller:
    """Runs tasks registered on the worker's app in this process, for CeleryTaskStep."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def call_task(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> JSON:
        task = self._app.tasks.get(name)
        if task is None:
            raise SagaError(f"Celery task {name!r} is not registered on this worker")
        return task(*args, **kwargs)


def install(app: Celery, saga: Saga, *, settings: Mapping[str, Any] | None = None) -> Celery:
    """Bind ``saga`` to the Celery ``app``: JSON only, acks_late, prefetch 1, and the
    ``saga.execute`` task. ``settings`` override individual Celery settings (pickle stays out)."""
    merged = {**SAFE_SETTINGS, **(settings or {})}
    if "pickle" in merged["accept_content"] or merged["task_serializer"] != "json":
        raise ValueError("saga accepts JSON messages only")
    app.conf.update(merged)
    _ENGINES[app] = saga
    executor = Executor(saga, publisher=lambda: CeleryPublisher(app))
    caller = _TaskCaller(app)

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME, bind=True, acks_late=True, ignore_result=True
    )
    def execute(self: Any, *args: Any, **kwargs: Any) -> str:
        if args:
            logs.event(log, logging.WARNING, "dropped a step message with positional args")
            return "malformed"
        return executor.execute(kwargs, caller, telemetry.carrier_from_request(self.request))

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _fresh_pool(**_: Any) -> None:
        # A forked child must not share the parent's database connections.
        saga.forget_connections()

    @signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _check_pool(sender: Any = None, **_: Any) -> None:
        if sender is None or getattr(sender, "app", None) is not app:
            return
        consumed = getattr(sender.app.amqp.queues, "consume_from", None) or {}
        refusal = refused_pool(str(sender.pool_cls), set(consumed), saga_queues(saga))
        if refusal:
            log.critical(refusal)
            # Celery logs and swallows an Exception raised by a signal handler.
            raise SystemExit(f"saga: {refusal}")

    _register_worker(app, saga)
    return app


def _register_worker(app: Celery, saga: Saga) -> None:
    """Put the worker in the registry of live processes once it is ready (with the queues it
    consumes), beat it from a thread of its own, and remove it when the worker shuts down."""
    running: dict[str, Any] = {}

    @signals.worker_ready.connect(weak=False)  # type: ignore[untyped-decorator]
    def _ready(sender: Any = None, **_: Any) -> None:
        if getattr(sender, "app", None) is not app:
            return
        consumer = getattr(sender, "task_consumer", None)
        queues = [q.name for q in getattr(consumer, "queues", None) or []]
        if not queues:
            worker_app: Any = sender.app
            queues = list(worker_app.amqp.queues.consume_from or ())
        presence = Presence(saga, "worker", name=str(sender.hostname), queues=queues)
        presence.register()
        stopping = threading.Event()
        beat_in_thread(presence, stopping)
        running.update(presence=presence, stopping=stopping)

    @signals.worker_shutdown.connect(weak=False)  # type: ignore[untyped-decorator]
    def _shutdown(**_: Any) -> None:
        presence = running.pop("presence", None)
        if presence is not None:
            running.pop("stopping").set()
            presence.remove()


def saga_queues(saga: Saga) -> set[str]:
    """Every queue a step or compensation of a registered workflow is sent to."""
    return {wf.queue_for(step) for wf in saga.registry for step in wf.step_names}


def refused_pool(pool: str, consumed: set[str], queues: set[str]) -> str | None:
    """Why a worker with Celery pool ``pool`` consuming ``consumed`` (empty: every queue) must
    not run saga's steps, or ``None``. saga enforces a step's time limit on a process's main
    thread or, in the threads pool, on the step's own thread; gevent and eventlet run many steps
    on one thread, where neither can stop an overrunning step."""
    if "gevent" not in pool.lower() and "eventlet" not in pool.lower():
        return None
    serving = sorted(consumed & queues) if consumed else sorted(queues)
    if not serving:
        return None
    return (
        f"the {pool!r} pool cannot enforce saga steps' time limits; run queues "
        f"{', '.join(serving)} on a prefork, threads or solo worker (-P prefork|threads|solo)"
    )


def engine_of(app: Celery) -> Saga:
    """The engine :func:`install` bound to ``app``."""
    try:
        return _ENGINES[app]
    except KeyError:
        raise SagaError("no saga engine is installed on this Celery app") from None


def task_id(run_id: str, kind: str, step: str, attempt: int) -> str:
    """The deterministic Celery task id of one attempt (the same on every republish)."""
    return str(uuid.uuid5(_TASK_ID_NS, f"{run_id}:{kind}:{step}:{attempt}"))


class PublishTimeoutError(SagaError):
    """Publishing did not finish within its deadline (the broker may be unreachable)."""

    retryable = True


class CeleryPublisher:
    """Publishes step messages as ``saga.execute`` tasks, each bounded by a deadline, since a
    publish to an unreachable broker can otherwise hang."""

    def __init__(self, app: Celery, *, timeout: float = 5.0) -> None:
        self.app = app
        self.timeout = timeout
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="saga-publish")

    def publish(self, envelope: Envelope) -> None:
        """Publish one message or raise (``PublishTimeoutError`` past the deadline)."""
        msg = envelope.message
        options: dict[str, Any] = {
            "kwargs": msg.as_body(),
            "task_id": task_id(msg.run_id, msg.kind, msg.step, msg.attempt),
            "queue": envelope.queue,
            "routing_key": envelope.queue,
            "retry": False,
            "headers": dict(envelope.headers or {}),
        }
        if envelope.priority is not None:
            options["priority"] = envelope.priority
        if envelope.time_limit:
            # saga enforces the limit around the step's code (saga.timeouts); Celery's hard
            # limit only kills a child whose code ignored that, and the lease takes over.
            options["time_limit"] = envelope.time_limit + HARD_LIMIT_GRACE
        if envelope.countdown:
            options["countdown"] = envelope.countdown
        future = self._pool.submit(self.app.send_task, TASK_NAME, **options)
        try:
            future.result(timeout=self.timeout)
        except concurrent.futures.TimeoutError:
            # The stuck thread is abandoned with its connection; start afresh.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="saga-pub")
            self._reset_broker_pools()
            raise PublishTimeoutError(f"publish took over {self.timeout}s") from None

    def _reset_broker_pools(self) -> None:
        """Drop every broker connection and producer; the next publish makes fresh ones.
        (``app.pool.force_close_all()`` alone closes the pool for good: every later publish
        fails with "Acquire on closed pool" and the relay never recovers.)"""
        from kombu import pools

        pools.reset()  # type: ignore[no-untyped-call]  # closes and forgets kombu's pools
        self.app._pool = None
        amqp = self.app.__dict__.get("amqp")
        if amqp is not None:
            amqp._producer_pool = None

    def close(self) -> None:
        """Release the publishing thread."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def load_celery_app(spec: str) -> Celery:
    """Import ``module:attribute`` and return the Celery app it names."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise SagaError(f"--app must look like module:celery_app, got {spec!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise SagaError(f"cannot import {module_name!r}: {exc}") from None
    app = getattr(module, attr, None)
    if not isinstance(app, Celery):
        raise SagaError(f"{spec!r} is not a Celery app")
    return app
