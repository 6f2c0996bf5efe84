"""Everything saga does with Celery, behind one module.

:func:`install` wires an engine into the user's own Celery app (no global app): one task,
``saga.execute``, that runs step messages with options of its own, and a check of the worker's
settings at its start; the app's settings and its other tasks stay as they were.
:class:`CeleryPublisher` is how the relay puts messages on the broker.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import threading
import time
import uuid
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

from celery import Celery, bootsteps, signals
from celery.exceptions import Ignore

from saga import codec, logs, telemetry
from saga.app import Saga
from saga.context import JSON
from saga.errors import PermanentError, SagaError
from saga.executor import Executor
from saga.messages import Envelope
from saga.presence import Presence, beat_in_thread

log = logging.getLogger("saga.celery")
TASK_NAME = "saga.execute"
HARD_LIMIT_GRACE = 5.0
_TASK_ID_NS = uuid.UUID("5a9a0000-0000-4000-8000-00000000a9a5")
_ENGINES: weakref.WeakKeyDictionary[Celery, Saga] = weakref.WeakKeyDictionary()

TASK_OPTIONS: dict[str, Any] = {
    "name": TASK_NAME,
    "serializer": "json",
    "acks_late": True,
    # A pool process that dies with a message (killed, out of memory, SIGTERM sent to the
    # worker's whole process group) hands it back to the broker instead of acknowledging it:
    # if it died before the claim, another worker runs the step now, not after
    # republish_after; if after, the claim guard drops the copy (the step is claimed, and its
    # lease brings it back), so the message cannot loop.
    "reject_on_worker_lost": True,
    "ignore_result": True,
}
"""The options of saga's own task, ``saga.execute``; install() changes no setting of the app or
of its other tasks. Each message's queue and routing key are set when it is published."""

WORKER_SETTINGS: dict[str, Any] = {
    # A worker that prefetches holds messages it may not start for a long time.
    "worker_prefetch_multiplier": 1,
    # Celery cancels unacknowledged late-ack tasks when the broker connection is lost (their
    # messages come back); saga's claim guard makes the redelivered message harmless.
    "worker_cancel_long_running_tasks_on_connection_loss": True,
}
"""Worker-wide settings saga wants on a worker that serves its queues (they apply to every
task of the worker, so saga does not set them): set them on the app
(``app.conf.update(WORKER_SETTINGS)``) or per worker (``--prefetch-multiplier 1``). A worker
that consumes saga's queues without them logs one warning line at start."""


class _TaskCaller:
    """Runs tasks registered on the worker's app in this process, for CeleryTaskStep."""

    def __init__(self, app: Celery) -> None:
        self._app = app

    def call_task(self, name: str, args: Sequence[Any], kwargs: Mapping[str, Any]) -> JSON:
        task = self._app.tasks.get(name)
        if task is None:
            raise SagaError(f"Celery task {name!r} is not registered on this worker")
        try:
            return task(*args, **kwargs)
        except Ignore:
            # self.replace() sends the replacement to Celery and raises Ignore: saga cannot
            # follow it, and the step has no result.
            raise PermanentError(
                f"Celery task {name!r} called self.replace() (or raised Ignore), which saga "
                "cannot follow: declare the replacement's tasks as steps instead"
            ) from None


def install(app: Celery, saga: Saga) -> Celery:
    """Bind ``saga`` to the Celery ``app``: register saga's task ``saga.execute`` (JSON,
    acks_late, no result; :data:`TASK_OPTIONS`) and the worker checks. No setting of the app
    or of its other tasks changes; :data:`WORKER_SETTINGS` are checked at worker start."""
    _ENGINES[app] = saga
    app.steps["consumer"].add(GuardedConsumer)
    saga.use_publisher(lambda: CeleryPublisher(app))
    executor = Executor(saga, queues=lambda: consumed_queues(app))
    caller = _TaskCaller(app)

    # Not shared: another Celery app in this process gets its own (with its own engine).
    @app.task(  # type: ignore[untyped-decorator]
        bind=True, shared=False, Strategy=f"{__name__}:guarded_strategy", **TASK_OPTIONS
    )
    def execute(self: Any, *args: Any, **kwargs: Any) -> str:
        if args:
            logs.event(log, logging.WARNING, "dropped a step message with positional args")
            return "malformed"
        hard = (getattr(self.request, "timelimit", None) or (None, None))[0]
        return executor.execute(
            kwargs,
            caller,
            telemetry.carrier_from_request(self.request),
            deadline=time.monotonic() + float(hard) if hard else None,
        )

    @signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _fresh_pool(**_: Any) -> None:
        # A forked child must not share the parent's database connections.
        saga.forget_connections()

    @signals.worker_init.connect(weak=False)  # type: ignore[untyped-decorator]
    def _check_worker(sender: Any = None, **_: Any) -> None:
        if sender is None or getattr(sender, "app", None) is not app:
            return
        consumed = set(consumed_queues(app))
        queues = saga_queues(saga)
        refusal = refused_pool(str(sender.pool_cls), consumed, queues)
        if refusal:
            log.critical(refusal)
            # Celery logs and swallows an Exception raised by a signal handler.
            raise SystemExit(f"saga: {refusal}")
        conf = sender.app.conf
        warning = worker_warning(
            {
                # The worker's own value: --prefetch-multiplier wins over the app's setting.
                "worker_prefetch_multiplier": getattr(
                    sender, "prefetch_multiplier", conf.worker_prefetch_multiplier
                ),
                "worker_cancel_long_running_tasks_on_connection_loss": (
                    conf.worker_cancel_long_running_tasks_on_connection_loss
                ),
                "accept_content": conf.accept_content,
            },
            consumed,
            queues,
        )
        if warning:
            log.warning(warning)

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


def consumed_queues(app: Celery) -> frozenset[str]:
    """The queues this worker process consumes (``-Q``, set before the pool forks; without it,
    every queue the app declares)."""
    queues = app.amqp.queues
    consume_from = getattr(queues, "consume_from", None)
    return frozenset(consume_from if consume_from is not None else queues)


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


def worker_warning(conf: Mapping[str, Any], consumed: set[str], queues: set[str]) -> str | None:
    """The one warning line for a worker consuming ``consumed`` (empty: every queue) whose
    settings ``conf`` differ from what saga wants on its queues (:data:`WORKER_SETTINGS`, and
    no pickle accepted), or ``None``."""
    serving = sorted(consumed & queues) if consumed else sorted(queues)
    if not serving:
        return None
    wrong = [
        f"{name}={conf.get(name)!r} (saga wants {want!r})"
        for name, want in WORKER_SETTINGS.items()
        if conf.get(name) != want
    ]
    if "pickle" in (conf.get("accept_content") or ()):
        wrong.append("accept_content includes 'pickle' (saga's messages are JSON only)")
    if not wrong:
        return None
    return (
        f"saga: this worker serves saga queues {', '.join(serving)} with " + "; ".join(wrong)
        + ": set them on the Celery app (app.conf.update(saga.celery_adapter.WORKER_SETTINGS))"
        " or with --prefetch-multiplier=1"
    )


# -- poison messages -----------------------------------------------------------------------------
#
# Celery's consumer hands every message whose ``task`` header names saga.execute to the task's
# strategy, in the worker's main process. Celery's default strategy assumes a well-formed
# protocol 2 message: a body that is not ``[args, kwargs, embed]``, a missing ``id`` header or
# a ``timelimit`` that is not a pair of numbers raises out of the consumer, and the worker's
# main process exits (and on Redis the message comes back and kills the next worker too).
# saga's step messages have one known shape, so the strategy below checks it first and drops
# anything else with one log line, rejected without requeue: a RabbitMQ queue with a
# dead-letter exchange gets the message there; Redis discards it.

MAX_MESSAGE_BYTES = 64 * 1024
"""The largest saga.execute body accepted (step messages carry ids and names: a few hundred
bytes)."""
MESSAGE_DEPTH = 4
"""How deeply a saga.execute body may nest (``[args, {"run_id": ...}, embed]`` is 2)."""
HEADER_TEXT_LIMIT = 4096
"""The longest string a saga.execute message header may hold."""
_TEXT_HEADERS = (
    "lang", "root_id", "parent_id", "group", "shadow", "origin", "argsrepr", "kwargsrepr",
    "eta", "expires", "meth",
)
_EMBED_KEYS = ("callbacks", "errbacks", "chain", "chord")


def _is_limit(value: object) -> bool:
    """A time limit Celery's pool can use: a finite number >= 0."""
    return (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and value >= 0
    )


def _header_problem(headers: Mapping[Any, Any]) -> str | None:
    task_id = headers.get("id")
    if not isinstance(task_id, str) or not 0 < len(task_id) <= 200:
        return "the id header is missing or not a string of 1-200 characters"
    for name, value in headers.items():
        if not isinstance(name, str):
            return f"a header name is a {type(name).__name__}, not a string"
        if isinstance(value, str):
            if len(value) > HEADER_TEXT_LIMIT or logs.clean(value, HEADER_TEXT_LIMIT) != value:
                return f"header {name!r} is too long or holds control characters"
        elif name in _TEXT_HEADERS and value is not None:
            return f"header {name!r} is a {type(value).__name__}, not a string"
    timelimit = headers.get("timelimit")
    if timelimit is not None and not (
        isinstance(timelimit, list | tuple)
        and len(timelimit) == 2
        and all(v is None or _is_limit(v) for v in timelimit)
    ):
        return "header 'timelimit' is not a pair of numbers"
    retries = headers.get("retries")
    if retries is not None and (isinstance(retries, bool) or not isinstance(retries, int)):
        return "header 'retries' is not an integer"
    return None


def _body_problem(payload: Any) -> str | None:
    if not isinstance(payload, list | tuple) or len(payload) != 3:
        what = type(payload).__name__
        if isinstance(payload, list | tuple):
            what += f" of {len(payload)} items"
        return f"the body is a {what}, not [args, kwargs, embed]"
    # Step messages are flat: deep nesting could only exhaust the stack where Celery pickles
    # the request for the pool.
    found = codec.problem(payload, "body", max_depth=MESSAGE_DEPTH)
    if found:
        return f"{found[1]} at {found[0]}"
    args, kwargs, embed = payload
    if not isinstance(args, list | tuple):
        return f"args is a {type(args).__name__}, not a list"
    if not isinstance(kwargs, dict) or not all(isinstance(k, str) for k in kwargs):
        return "kwargs is not an object with string keys"
    if embed is not None and not isinstance(embed, dict):
        return f"embed is a {type(embed).__name__}, not an object"
    if embed and any(embed.get(k) for k in _EMBED_KEYS):
        return "a step message carries no callbacks, errbacks, chain or chord"
    return None


def message_problem(message: Any, body: Any) -> str | None:
    """What makes a message for ``saga.execute`` unacceptable, or ``None`` when it has the
    shape of a saga step message: protocol 2, JSON, at most :data:`MAX_MESSAGE_BYTES`,
    well-typed headers, a body ``[args, kwargs, embed]`` without callbacks. (What the kwargs
    say is checked later, in the pool, by :meth:`saga.messages.StepMessage.parse`.)"""
    if body is not None:
        return "a protocol 1 message (saga sends protocol 2 only)"
    headers = message.headers
    if not isinstance(headers, Mapping):
        return "the headers are not an object"
    problem = _header_problem(headers)
    if problem:
        return problem
    raw = message.body
    size = len(raw) if isinstance(raw, bytes | str) else 0
    if size > MAX_MESSAGE_BYTES:
        return f"the body is {size} bytes, over the limit of {MAX_MESSAGE_BYTES}"
    if message.content_type != "application/json":
        return f"content type {message.content_type!r} is not accepted (JSON only)"
    try:
        payload = message.decode()
    except Exception as exc:
        return f"the body does not decode: {logs.describe(exc)}"
    return _body_problem(payload)


def _drop(
    message: Any,
    problem: str,
    connection_errors: tuple[type[BaseException], ...],
    what: str = f"a malformed {TASK_NAME} message",
) -> None:
    headers = message.headers if isinstance(message.headers, Mapping) else {}
    raw = message.body
    logs.event(
        log,
        logging.WARNING,
        f"dropped {what}: {problem}",
        task_id=headers.get("id"),
        content_type=message.content_type,
        size=len(raw) if isinstance(raw, bytes | str) else None,
    )
    if message.acknowledged:
        return
    try:
        message.reject(requeue=False)  # to the dead-letter exchange, where there is one
    except connection_errors as exc:
        logs.event(log, logging.WARNING, f"could not reject the message: {logs.describe(exc)}")


def guarded_strategy(task: Any, app: Celery, consumer: Any, **options: Any) -> Any:
    """The task strategy of ``saga.execute`` (named by its ``Strategy`` attribute, Celery's
    hook for it): Celery's default strategy behind :func:`message_problem`, so that no message
    on a saga queue can stop the worker's main process. A message with a problem, or one the
    default strategy raises on, is logged in one line and rejected without requeue."""
    from celery.worker.strategy import default

    handle = default(task, app, consumer, **options)
    connection_errors = tuple(consumer.connection_errors)

    def on_message(message: Any, body: Any, *args: Any, **kwargs: Any) -> Any:
        problem = message_problem(message, body)
        if problem is None:
            try:
                return handle(message, body, *args, **kwargs)
            except Exception as exc:  # InvalidTaskError (bad eta...) or anything unforeseen
                problem = f"Celery refused it: {logs.describe(exc)}"
        _drop(message, problem, connection_errors)
        return None

    return on_message


class GuardedConsumer(bootsteps.StartStopStep):  # type: ignore[misc]
    """A consumer bootstep (Celery's extension point for the worker's consumer) that guards
    Celery's own task handler: a message Celery cannot even route to a task (a ``task`` header
    that is a list or an object, an unregistered task without an ``id``) makes that handler
    raise, which would stop the worker's main process. The message is logged in one line and
    rejected without requeue instead; every other message is handled as Celery handles it."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, c: Any) -> None:
        """Wrap the consumer's task handler factory (once: the consumer restarts its steps
        when the broker connection comes back)."""
        if getattr(c, "_saga_guarded", False):
            return
        create = c.create_task_handler
        errors = tuple(c.connection_errors)

        def create_guarded(*args: Any, **kwargs: Any) -> Any:
            handle = create(*args, **kwargs)

            def on_task_received(message: Any) -> Any:
                try:
                    return handle(message)
                except Exception as exc:
                    problem = f"Celery could not handle it: {logs.describe(exc)}"
                    _drop(message, problem, errors, what="a message")
                    return None

            return on_task_received

        c.create_task_handler = create_guarded
        c._saga_guarded = True


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
        _, error = self.publish_many([envelope])
        if error is not None:
            raise error

    def publish_many(self, envelopes: Sequence[Envelope]) -> tuple[int, Exception | None]:
        """Publish messages in order, on one producer, in one hand-off to the publishing
        thread; how many went out, and the error that stopped the rest (a
        ``PublishTimeoutError`` when the whole batch ran past its deadline of ``timeout``
        seconds plus a millisecond a message)."""
        sent: list[int] = [0]

        def publish_all() -> None:
            with self.app.producer_or_acquire() as producer:
                for envelope in envelopes:
                    self.app.send_task(TASK_NAME, producer=producer, **self._options(envelope))
                    sent[0] += 1

        future = self._pool.submit(publish_all)
        try:
            future.result(timeout=self.timeout + 0.001 * len(envelopes))
        except concurrent.futures.TimeoutError:
            # The stuck thread is abandoned with its connection; start afresh. A message it
            # was sending when it stuck counts as not sent: published twice at most.
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="saga-pub")
            self._reset_broker_pools()
            done = sent[0]
            return done, PublishTimeoutError(f"publishing took over {self.timeout}s")
        except Exception as exc:
            return sent[0], exc
        return sent[0], None

    @staticmethod
    def _options(envelope: Envelope) -> dict[str, Any]:
        msg = envelope.message
        options: dict[str, Any] = {
            "kwargs": msg.as_body(),
            # Whatever the app's own defaults: saga's messages are JSON, and have no result.
            "serializer": "json",
            "ignore_result": True,
            "task_id": task_id(msg.run_id, msg.kind, msg.step, msg.attempt),
            "queue": envelope.queue,
            "routing_key": envelope.queue,
            "retry": False,
            "headers": dict(envelope.headers or {}),
            # Given, Celery does not compute them with its saferepr (a quarter of a publish's
            # CPU); what tools like Flower show is the step the message names.
            "argsrepr": "()",
            "kwargsrepr": f"{{run_id={msg.run_id} kind={msg.kind} step={msg.step} "
            f"attempt={msg.attempt}}}",
        }
        if envelope.priority is not None:
            options["priority"] = envelope.priority
        if envelope.time_limit:
            # saga enforces the limit around the step's code (saga.timeouts); Celery's hard
            # limit only kills a child whose code ignored that, and the lease takes over.
            options["time_limit"] = envelope.time_limit + HARD_LIMIT_GRACE
        if envelope.countdown:
            options["countdown"] = envelope.countdown
        return options

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
