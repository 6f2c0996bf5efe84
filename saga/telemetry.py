"""OpenTelemetry glue: carrying the trace context from ``start`` through the outbox to the worker.
Without an SDK configured the API is a no-op and this costs next to nothing."""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import context as otel_context
from opentelemetry import propagate


def capture_context() -> dict[str, str] | None:
    """The current trace context as W3C headers, or ``None`` when there is no active span."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier or None


def extract_context(carrier: Mapping[str, str] | None) -> otel_context.Context:
    """The context a stored carrier describes (the empty context for ``None``)."""
    return propagate.extract(dict(carrier or {}))
