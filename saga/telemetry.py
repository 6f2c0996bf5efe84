"""OpenTelemetry glue: carrying the trace context from ``start`` through the outbox to the worker.

The context current at :meth:`saga.Saga.start` is stored with the run and in each of its outbox
rows. The relay publishes each message in a ``saga publish`` span (kind PRODUCER), a child of
that stored context, and puts the publish span's context in the message headers. The worker runs
each attempt in a ``saga step`` or ``saga compensation`` span (kind CONSUMER): a child of the
publish span when the headers came through and belong to the run's trace, else of the run's
stored context (read back by the claim), so an attempt retried hours later is still in the
run's trace.

Without an SDK configured the API is a no-op and this costs next to nothing.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from saga import logs, metrics
from saga.errors import type_name

_tracer = trace.get_tracer("saga")


def capture_context() -> dict[str, str] | None:
    """The current trace context as W3C headers, or ``None`` when there is no active span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a stored carrier describes (the empty context for ``None``)."""
    return propagate.extract(dict(carrier or {}))


def carrier_from_request(request: Any) -> dict[str, str] | None:
    """The trace headers of a Celery task request (custom message headers become attributes of
    the request; some versions nest them under ``headers``), or ``None``."""
    nested = getattr(request, "headers", None)
    nested = nested if isinstance(nested, Mapping) else {}
    carrier: dict[str, str] = {}
    for name in propagate.get_global_textmap().fields:
        value = getattr(request, name, None) or nested.get(name)
        if isinstance(value, str) and value:
            carrier[name] = value
    return carrier or None


def parent_context(
    stored: Mapping[str, str] | None, carrier: Mapping[str, str] | None
) -> otel_context.Context:
    """The parent of an attempt's span: the message headers (the relay's publish span) when
    they continue the run's trace, else the run's stored context."""
    run_ctx = extract_context(stored)
    if carrier:
        msg_ctx = extract_context(carrier)
        msg_span = trace.get_current_span(msg_ctx).get_span_context()
        run_span = trace.get_current_span(run_ctx).get_span_context()
        if msg_span.is_valid and (not run_span.is_valid or run_span.trace_id == msg_span.trace_id):
            return msg_ctx
    return run_ctx


@dataclass
class Attempt:
    """What :func:`attempt` needs back: the attempt's outcome."""

    outcome: str = "error"


@contextmanager
def attempt(
    workflow: str,
    run_id: str,
    kind: str,
    step: str,
    number: int,
    stored: Mapping[str, str] | None,
    carrier: Mapping[str, str] | None = None,
) -> Iterator[Attempt]:
    """The span (current while the step's code runs) and the metrics of one claimed attempt;
    set ``outcome`` on what it yields."""
    result = Attempt()
    attributes: dict[str, str | int] = {
        "saga.workflow": workflow,
        "saga.run_id": run_id,
        "saga.step": step,
        "saga.kind": kind,
        "saga.attempt": number,
    }
    started = time.perf_counter()
    with _tracer.start_as_current_span(
        f"saga {kind} {workflow}.{step}",
        context=parent_context(stored, carrier),
        kind=SpanKind.CONSUMER,
        attributes=attributes,
    ) as span:
        try:
            yield result
        finally:
            if span.is_recording():
                span.set_attribute("saga.outcome", result.outcome)
                if result.outcome in metrics.FAILED_OUTCOMES:
                    span.set_status(Status(StatusCode.ERROR, f"attempt {result.outcome}"))
            metrics.record_attempt(
                workflow, step, kind, result.outcome, time.perf_counter() - started
            )


def record_exception(exc: BaseException) -> None:
    """Record ``exc`` on the current span (the attempt's)."""
    span = trace.get_current_span()
    if span.is_recording():
        text = logs.describe(exc, 500)
        try:
            span.record_exception(exc)
        except Exception:  # its __str__ raised: record what can be said about it
            span.add_event(
                "exception", {"exception.type": type_name(exc), "exception.message": text}
            )
        span.set_status(Status(StatusCode.ERROR, text[:500]))


@contextmanager
def publishing(row: Mapping[str, Any]) -> Iterator[dict[str, str] | None]:
    """The span of publishing one outbox row (a child of the run's stored context); yields the
    headers to send with it: the publish span's context, else the stored one."""
    stored = row.get("trace_context")
    attributes: dict[str, str | int] = {
        "saga.workflow": row["workflow"],
        "saga.run_id": str(row["run_id"]),
        "saga.step": row["step"],
        "saga.kind": row["kind"],
        "saga.attempt": row["attempt"],
        "messaging.destination.name": row["queue"],
        "messaging.operation.type": "publish",
    }
    with _tracer.start_as_current_span(
        f"saga publish {row['workflow']}.{row['step']}",
        context=extract_context(stored),
        kind=SpanKind.PRODUCER,
        attributes=attributes,
    ):
        yield capture_context() or (dict(stored) if stored else None)
    countdown = row.get("countdown") or 0.0
    metrics.record_publish(row["workflow"], row["kind"], row["queue"], -float(countdown))
