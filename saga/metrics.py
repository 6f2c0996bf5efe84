"""Metrics through the OpenTelemetry metrics API (meter ``saga``).

Instruments (attributes in brackets):

- ``saga.step.duration`` histogram, seconds: one step or compensation attempt, from its claim to
  its recorded outcome [workflow, step, kind, outcome]
- ``saga.step.attempts`` counter: attempts run [workflow, step, kind, outcome]
- ``saga.step.failures`` counter: attempts that failed, retried or for good [same]
- ``saga.compensations`` counter: compensation attempts run [workflow, step, outcome]
- ``saga.outbox.published`` counter: messages the relay put on the broker [workflow, kind, queue]
- ``saga.outbox.publish_lag`` histogram, seconds: how long a message was due before the relay
  published it [workflow, kind, queue]
- ``saga.outbox.backlog`` gauge: due messages not yet published [schema, queue]
- ``saga.outbox.oldest_age`` gauge, seconds: how long the oldest of them has been due
  [schema, queue]
- ``saga.runs`` gauge: runs in each state [schema, workflow, state], read from the counters
  of :mod:`saga.store.counts` (a few small rows and index probes, not a count of every run)

The gauges query the database, and only when a reader collects them (say once a minute), never
on the hot path, for the engines handed to :func:`observe` (the relay observes its own).
Without an SDK configured every instrument is the API's no-op.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from opentelemetry import metrics
from opentelemetry.metrics import CallbackOptions, Observation
from sqlalchemy import Connection

from saga.store import counts

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.metrics")

SECONDS_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
)
FAILED_OUTCOMES = frozenset({"retry_scheduled", "failed"})
QUERY_TIMEOUT_MS = 5000

_meter = metrics.get_meter("saga")

step_duration = _meter.create_histogram(
    "saga.step.duration",
    unit="s",
    description="Duration of a step or compensation attempt",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)
attempts = _meter.create_counter(
    "saga.step.attempts", unit="{attempt}", description="Step and compensation attempts run"
)
failures = _meter.create_counter(
    "saga.step.failures", unit="{attempt}", description="Attempts that failed"
)
compensations = _meter.create_counter(
    "saga.compensations", unit="{attempt}", description="Compensation attempts run"
)
published = _meter.create_counter(
    "saga.outbox.published", unit="{message}", description="Messages published by the relay"
)
publish_lag = _meter.create_histogram(
    "saga.outbox.publish_lag",
    unit="s",
    description="Time from a message being due to the relay publishing it",
    explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
)


def record_attempt(workflow: str, step: str, kind: str, outcome: str, seconds: float) -> None:
    """Count one attempt and its duration."""
    attrs = {"saga.workflow": workflow, "saga.step": step, "saga.kind": kind,
             "saga.outcome": outcome}
    step_duration.record(seconds, attrs)
    attempts.add(1, attrs)
    if outcome in FAILED_OUTCOMES:
        failures.add(1, attrs)
    if kind == "compensation":
        compensations.add(
            1, {"saga.workflow": workflow, "saga.step": step, "saga.outcome": outcome}
        )


def record_publish(workflow: str, kind: str, queue: str, lag: float) -> None:
    """Count one published message and how late it went out."""
    attrs = {"saga.workflow": workflow, "saga.kind": kind, "saga.queue": queue}
    published.add(1, attrs)
    publish_lag.record(max(0.0, lag), attrs)


# -- gauges, read at collection time -----------------------------------------------------------

_BACKLOG = """
SELECT queue, count(*) AS n,
       coalesce(EXTRACT(EPOCH FROM (now() - min(available_at))), 0)::float8 AS oldest
FROM {outbox} WHERE published_at IS NULL AND available_at <= now()
GROUP BY queue
"""


@dataclass
class _Observed:
    """Series an engine reported once: reported as 0 while absent, so that they do not vanish."""

    queues: set[str] = field(default_factory=set)
    runs: set[tuple[str, str]] = field(default_factory=set)
    backlog: tuple[float, dict[str, tuple[int, float]]] | None = None
    """The last backlog query (monotonic time, rows): both backlog gauges read one query."""


_observed: weakref.WeakKeyDictionary[Saga, _Observed] = weakref.WeakKeyDictionary()


def observe(saga: Saga) -> None:
    """Report the outbox backlog and the runs by state of ``saga``'s database (queried at
    collection time only). Idempotent; the engine is held weakly."""
    _observed.setdefault(saga, _Observed())


def unobserve(saga: Saga) -> None:
    """Stop reporting ``saga``'s gauges."""
    _observed.pop(saga, None)


def _query(saga: Saga, template: str | Callable[[Connection], list[Any]]) -> list[Any] | None:
    try:
        with saga.engine.connect() as conn, conn.begin():
            conn.exec_driver_sql(f"SET LOCAL statement_timeout = {QUERY_TIMEOUT_MS}")
            if callable(template):
                return template(conn)
            return list(conn.execute(saga.tables.sql(template)).mappings())
    except Exception as exc:  # a collection must never break the exporter
        log.debug("metrics query failed: %s: %s", type(exc).__name__, exc)
        return None


def _run_counts(saga: Saga) -> Callable[[Connection], list[Any]]:
    def read(conn: Connection) -> list[Any]:
        by_workflow = counts.runs_by_state(conn, saga.tables)
        return [
            {"workflow": wf, "state": state, "n": n}
            for wf, states in by_workflow.items() for state, n in states.items()
        ]

    return read


def _backlog_rows(
    saga: Saga, seen: _Observed, fresh: bool
) -> dict[str, tuple[int, float]] | None:
    now = time.monotonic()
    if not fresh and seen.backlog is not None and now - seen.backlog[0] < 1.0:
        return seen.backlog[1]
    rows = _query(saga, _BACKLOG)
    if rows is None:
        return None
    found = {r["queue"]: (int(r["n"]), float(r["oldest"])) for r in rows}
    seen.queues |= found.keys()
    result = {q: found.get(q, (0, 0.0)) for q in seen.queues}
    seen.backlog = (now, result)
    return result


def _observe_backlog(options: CallbackOptions) -> Iterable[Observation]:
    for saga, seen in list(_observed.items()):
        rows = _backlog_rows(saga, seen, fresh=True)
        for queue, (count, _) in (rows or {}).items():
            yield Observation(count, {"saga.schema": saga.settings.schema, "saga.queue": queue})


def _observe_oldest(options: CallbackOptions) -> Iterable[Observation]:
    for saga, seen in list(_observed.items()):
        rows = _backlog_rows(saga, seen, fresh=False)  # the backlog gauge's query, just made
        for queue, (_, oldest) in (rows or {}).items():
            yield Observation(oldest, {"saga.schema": saga.settings.schema, "saga.queue": queue})


def _observe_runs(options: CallbackOptions) -> Iterable[Observation]:
    for saga, seen in list(_observed.items()):
        rows = _query(saga, _run_counts(saga))
        if rows is None:
            continue
        found = {(r["workflow"], r["state"]): int(r["n"]) for r in rows}
        seen.runs |= found.keys()
        for workflow, state in sorted(seen.runs):
            yield Observation(
                found.get((workflow, state), 0),
                {"saga.schema": saga.settings.schema, "saga.workflow": workflow,
                 "saga.state": state},
            )


_meter.create_observable_gauge(
    "saga.outbox.backlog",
    callbacks=[_observe_backlog],
    unit="{message}",
    description="Due outbox messages not yet published",
)
_meter.create_observable_gauge(
    "saga.outbox.oldest_age",
    callbacks=[_observe_oldest],
    unit="s",
    description="How long the oldest due unpublished message has waited",
)
_meter.create_observable_gauge(
    "saga.runs", callbacks=[_observe_runs], unit="{run}", description="Runs by state"
)
