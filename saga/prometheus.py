"""Serving saga's OpenTelemetry metrics in the Prometheus text format (``/metrics``).

:func:`enable` sets up an OpenTelemetry ``MeterProvider`` whose reader is the Prometheus
exporter (``opentelemetry-exporter-prometheus``, in the ``saga[metrics]`` extra), unless the
process configured a provider of its own. :func:`serve` answers scrapes on a port (the relay's
``--metrics-port``); :func:`exposition` is the page itself (the dashboard's ``/metrics``).
"""

from __future__ import annotations

import logging
from typing import Any

from saga.errors import SagaError

log = logging.getLogger("saga.prometheus")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
"""The media type of the Prometheus text format."""

_enabled: list[Any] = []


def enable() -> None:
    """Route saga's metrics to a Prometheus reader (once per process)."""
    if _enabled:
        return
    try:
        from opentelemetry import metrics
        from opentelemetry.exporter.prometheus import PrometheusMetricReader
        from opentelemetry.sdk.metrics import MeterProvider
    except ImportError as exc:
        raise SagaError(
            f"Prometheus metrics need the saga[metrics] extra ({exc.name} is missing)"
        ) from None
    if isinstance(metrics.get_meter_provider(), MeterProvider):
        log.warning(
            "a MeterProvider is configured already: add a PrometheusMetricReader to it to "
            "see saga's metrics on /metrics"
        )
    else:
        reader = PrometheusMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        _enabled.append(reader)
    _enabled.append(True)


def exposition() -> bytes:
    """The current metrics in the Prometheus text format."""
    from prometheus_client import REGISTRY, generate_latest

    return bytes(generate_latest(REGISTRY))


def serve(port: int, host: str = "127.0.0.1") -> Any:
    """Enable the metrics and answer scrapes on ``host:port`` from a daemon thread."""
    enable()
    from prometheus_client import start_http_server

    return start_http_server(port, addr=host)
