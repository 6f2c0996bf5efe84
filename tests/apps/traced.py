"""A Celery app whose workflow the tracing tests follow, as their worker and relay import it.

Configured from the environment: SAGA_DATABASE_URL, SAGA_BROKER_URL, SAGA_TEST_QUEUE, and
SAGA_TEST_SPAN_FILE: when set, this process (the relay at import, each forked worker child on
``worker_process_init``) gets an SDK tracer provider that appends every finished span to that
file as a JSON line, so the test can read the spans of its subprocesses.

``traced.order``: ``reserve`` -> ``charge`` -> ``ship``; ``reserve`` and ``charge`` have
compensations. Per run input ``{"fail_once": [steps], "fail": [steps]}``: a step in
``fail_once`` fails its first attempt (and is retried), one in ``fail`` fails for good.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from celery import Celery, signals
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult

import saga
from saga import PermanentError, RetryPolicy, StepContext, Workflow
from saga.celery_adapter import WORKER_SETTINGS

SPAN_FILE_ENV = "SAGA_TEST_SPAN_FILE"
QUEUE = os.environ.get("SAGA_TEST_QUEUE", "saga")
QUICK = RetryPolicy(max_attempts=3, initial_delay=0.2, max_delay=0.5, jitter=0.0)


# -- spans to a file -----------------------------------------------------------------------------


def span_doc(span: ReadableSpan) -> dict[str, Any]:
    """What the tests read of a finished span."""
    ctx = span.get_span_context()
    assert ctx is not None
    return {
        "name": span.name,
        "trace_id": format(ctx.trace_id, "032x"),
        "span_id": format(ctx.span_id, "016x"),
        "parent_id": format(span.parent.span_id, "016x") if span.parent else None,
        "kind": span.kind.name,
        "attributes": dict(span.attributes or {}),
        "status": span.status.status_code.name,
        "events": [
            {"name": e.name, "attributes": dict(e.attributes or {})} for e in span.events
        ],
        "service": span.resource.attributes.get("service.name"),
        "pid": os.getpid(),
    }


class JsonLinesSpanExporter(SpanExporter):
    """Appends each span as one JSON line; several processes may share the file (each export is
    a single ``O_APPEND`` write, and nothing stays open across a fork)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        data = "".join(json.dumps(span_doc(s), default=str) + "\n" for s in spans).encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        """Nothing to release."""


_installed_in: int | None = None


def setup_tracing(service: str) -> None:
    """Install the span-file tracer provider in this process when SAGA_TEST_SPAN_FILE is set."""
    global _installed_in  # noqa: PLW0603
    path = os.environ.get(SPAN_FILE_ENV)
    if not path or _installed_in == os.getpid():
        return
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesSpanExporter(path)))
    trace.set_tracer_provider(provider)
    _installed_in = os.getpid()


def _in_celery_worker() -> bool:
    return "worker" in sys.argv[1:]


@signals.worker_process_init.connect(weak=False)  # type: ignore[untyped-decorator]
def _trace_worker_child(**_: Any) -> None:
    setup_tracing("saga-worker")


if not _in_celery_worker():
    setup_tracing("saga-relay")


# -- the workflow --------------------------------------------------------------------------------


def _act(ctx: StepContext) -> Any:
    inp = ctx.input if isinstance(ctx.input, dict) else {}
    if ctx.step in inp.get("fail", []):
        raise PermanentError(f"{ctx.step} declined")
    if ctx.step in inp.get("fail_once", []) and ctx.attempt == 1:
        raise RuntimeError(f"{ctx.step} failed on attempt {ctx.attempt}")
    return {"step": ctx.step, "attempt": ctx.attempt}


def _undo(ctx: StepContext) -> Any:
    return {"undone": ctx.step}


def workflows(queue: str = QUEUE) -> list[Workflow]:
    """The traced workflow with its messages on ``queue`` (the test process builds the same
    definition as its workers)."""
    wf = Workflow("traced.order", retry=QUICK, time_limit=20, queue=queue)
    wf.add_step("reserve", _act, compensate=_undo)
    wf.add_step("charge", _act, after=["reserve"], compensate=_undo)
    wf.add_step("ship", _act, after=["charge"])
    return [wf]


registry = saga.Registry(*workflows())
engine = saga.Saga(
    registry,
    database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://saga-not-configured/none"),
)
app = Celery("saga-traced", broker=os.environ.get("SAGA_BROKER_URL", "redis://127.0.0.1:6379/5"))
saga.install(app, engine)
# What saga wants of a worker serving its queues (install() leaves the app's settings alone).
app.conf.update(WORKER_SETTINGS, broker_connection_retry_on_startup=True)
