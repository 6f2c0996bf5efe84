"""Tracing, metrics and structured logs.

A run started inside a span is one trace: the starting span, the relay's publish spans (its
children), and every step and compensation attempt (children of a publish span, or of the
starting span when the message's headers were lost), across retries. In-process tests drive the
relay and executor with in-memory exporters; the last test runs a real worker and relay, which
write their spans to a file (see ``tests/apps/traced.py``).
"""

from __future__ import annotations

import json
import logging
import secrets
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from sqlalchemy import text

import saga
from saga import metrics as saga_metrics
from saga.executor import Executor
from saga.logs import JsonFormatter
from saga.messages import Envelope
from saga.relay import Relay
from tests.apps import traced
from tests.support.procs import Supervisor
from tests.support.waiting import wait_until

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
APP = "tests.apps.traced:app"
WORKFLOW = "traced.order"
INPUT = {"fail_once": ["charge"], "fail": ["ship"]}
FINISHED = {"completed", "failed", "compensated", "compensation_failed", "cancelled", "resolved"}

# What INPUT makes happen: (kind, step, attempt) -> outcome.
EXPECTED_ATTEMPTS = {
    ("step", "reserve", 1): "completed",
    ("step", "charge", 1): "retry_scheduled",
    ("step", "charge", 2): "completed",
    ("step", "ship", 1): "failed",
    ("compensation", "charge", 1): "completed",
    ("compensation", "reserve", 1): "completed",
}

# -- one SDK per test process --------------------------------------------------------------------

_spans = InMemorySpanExporter()
_reader: InMemoryMetricReader | None = None


def _install_sdk() -> InMemoryMetricReader:
    """Global SDK providers for this process (set once: OpenTelemetry allows no override)."""
    global _reader  # noqa: PLW0603
    if _reader is None:
        provider = trace.get_tracer_provider()
        if not isinstance(provider, TracerProvider):
            provider = TracerProvider()
            trace.set_tracer_provider(provider)
        provider.add_span_processor(SimpleSpanProcessor(_spans))
        _reader = InMemoryMetricReader()
        otel_metrics.set_meter_provider(MeterProvider(metric_readers=[_reader]))
        if not isinstance(otel_metrics.get_meter_provider(), MeterProvider):
            pytest.skip("another meter provider is installed in this process")
    return _reader


@pytest.fixture
def sdk() -> Iterator[InMemoryMetricReader]:
    """The in-memory span exporter (emptied) and metric reader of this process."""
    reader = _install_sdk()
    _spans.clear()
    yield reader
    _spans.clear()


@pytest.fixture
def engine(db_url: str) -> Iterator[saga.Saga]:
    """An engine with the traced workflow, on a fresh database."""
    eng = saga.Saga(saga.Registry(*traced.workflows("traced")), database_url=db_url)
    try:
        yield eng
    finally:
        saga_metrics.unobserve(eng)
        eng.engine.dispose()


# -- driving the relay and the executor in this process ----------------------------------------


class Collecting:
    """A publisher that keeps messages for the test to execute."""

    def __init__(self) -> None:
        self.sent: list[tuple[dict[str, Any], dict[str, str] | None, float | None]] = []

    def publish(self, envelope: Envelope) -> None:
        headers = dict(envelope.headers) if envelope.headers else None
        self.sent.append((envelope.message.as_body(), headers, envelope.countdown))


def run_state(engine: saga.Saga, run_id: str) -> str:
    return str(engine.get_run(run_id)["state"])


def drive(
    engine: saga.Saga,
    run_id: str,
    *,
    drop_headers: set[tuple[str, str, int]] | None = None,
    timeout: float = 30,
) -> list[str]:
    """Relay and execute until the run finishes; the outcomes in order. Messages named in
    ``drop_headers`` (kind, step, attempt) are executed as if the broker lost their headers."""
    publisher = Collecting()
    relay = Relay(engine, publisher, lookahead=5.0)
    executor = Executor(engine)
    outcomes: list[str] = []
    deadline = time.monotonic() + timeout
    while run_state(engine, run_id) not in FINISHED:
        assert time.monotonic() < deadline, f"run stuck in {run_state(engine, run_id)}"
        relay.publish_batch()
        while publisher.sent:
            body, headers, countdown = publisher.sent.pop(0)
            if countdown:
                time.sleep(countdown)
            if (body["kind"], body["step"], body["attempt"]) in (drop_headers or set()):
                headers = None
            outcomes.append(executor.execute(body, carrier=headers))
        time.sleep(0.02)
    return outcomes


def hexid(value: int) -> str:
    return format(value, "016x")


def attrs(span: ReadableSpan) -> dict[str, Any]:
    return dict(span.attributes or {})


def attempt_key(span: ReadableSpan) -> tuple[str, str, int]:
    a = attrs(span)
    return (a["saga.kind"], a["saga.step"], a["saga.attempt"])


# -- tracing in process ------------------------------------------------------------------------


def test_one_trace_from_start_through_publishes_to_every_attempt(
    sdk: InMemoryMetricReader, engine: saga.Saga
) -> None:
    tracer = trace.get_tracer("tests")
    with tracer.start_as_current_span("checkout") as root:
        run_id = engine.start_now(WORKFLOW, INPUT).run_id
    # The retry of charge runs as if hours later, its message's headers lost: it still belongs
    # to the run's trace, as a child of the stored (starting) context.
    outcomes = drive(engine, run_id, drop_headers={("step", "charge", 2)})
    assert run_state(engine, run_id) == "compensated"
    assert Counter(outcomes) == Counter(EXPECTED_ATTEMPTS.values())

    spans: tuple[ReadableSpan, ...] = _spans.get_finished_spans()
    root_ctx = root.get_span_context()
    assert {s.context.trace_id for s in spans} == {root_ctx.trace_id}

    publishes = [s for s in spans if s.name.startswith("saga publish ")]
    attempts = [s for s in spans if s.attributes and "saga.outcome" in s.attributes]
    assert len(publishes) == len(EXPECTED_ATTEMPTS)
    assert {attempt_key(s): attrs(s)["saga.outcome"] for s in attempts} == EXPECTED_ATTEMPTS
    assert len(attempts) == len(EXPECTED_ATTEMPTS)

    publish_ids = {s.context.span_id: s for s in publishes}
    for span in publishes:
        assert span.kind is trace.SpanKind.PRODUCER
        assert span.parent is not None and span.parent.span_id == root_ctx.span_id
        assert attrs(span)["saga.run_id"] == run_id
        assert attrs(span)["messaging.destination.name"] == "traced"
    for span in attempts:
        key = attempt_key(span)
        assert span.kind is trace.SpanKind.CONSUMER
        assert span.name == f"saga {key[0]} {WORKFLOW}.{key[1]}"
        assert attrs(span)["saga.workflow"] == WORKFLOW
        assert attrs(span)["saga.run_id"] == run_id
        assert span.parent is not None
        if key == ("step", "charge", 2):
            assert span.parent.span_id == root_ctx.span_id
        else:
            publish = publish_ids[span.parent.span_id]
            assert attempt_key(publish) == key

    by_key = {attempt_key(s): s for s in attempts}
    retried = by_key[("step", "charge", 1)]
    assert retried.status.status_code is trace.StatusCode.ERROR
    [exc] = [e for e in retried.events if e.name == "exception"]
    assert exc.attributes is not None
    assert exc.attributes["exception.type"] == "RuntimeError"
    assert "failed on attempt 1" in str(exc.attributes["exception.message"])
    failed = by_key[("step", "ship", 1)]
    assert failed.status.status_code is trace.StatusCode.ERROR
    assert any(e.name == "exception" for e in failed.events)
    assert by_key[("step", "charge", 2)].status.status_code is not trace.StatusCode.ERROR


def test_spans_of_code_inside_a_step_nest_under_its_attempt(
    sdk: InMemoryMetricReader, db_url: str
) -> None:
    def step(ctx: saga.StepContext) -> str:
        with trace.get_tracer("user").start_as_current_span("call the bank"):
            return "ok"

    wf = saga.Workflow("traced.nested")
    wf.add_step("pay", step)
    engine = saga.Saga(saga.Registry(wf), database_url=db_url)
    try:
        with trace.get_tracer("tests").start_as_current_span("request"):
            run_id = engine.start_now(wf, {}).run_id
        drive(engine, run_id)
    finally:
        engine.engine.dispose()
    spans = {s.name: s for s in _spans.get_finished_spans()}
    inner, attempt = spans["call the bank"], spans["saga step traced.nested.pay"]
    assert inner.parent is not None and inner.parent.span_id == attempt.context.span_id


def test_without_an_sdk_nothing_breaks_and_the_stored_context_is_passed_on() -> None:
    code = """
from opentelemetry import trace
from saga import telemetry
stored = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
row = {"trace_context": stored, "workflow": "w", "run_id": "r", "step": "s", "kind": "step",
       "attempt": 1, "queue": "q", "countdown": -0.5}
with telemetry.publishing(row) as headers:
    assert headers["traceparent"].startswith("00-0af7651916cd43dd8448eb211c80319c-"), headers
with telemetry.attempt("w", "r", "step", "s", 1, stored, headers) as attempt:
    span = trace.get_current_span()
    assert not span.is_recording()
    assert format(span.get_span_context().trace_id, "032x") == "0af7651916cd43dd8448eb211c80319c"
    attempt.outcome = "completed"
with telemetry.attempt("w", "r", "step", "s", 1, None, None) as attempt:
    telemetry.record_exception(RuntimeError("boom"))
print("ok")
"""
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True, text=True, timeout=60, cwd=REPO, check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# -- metrics -----------------------------------------------------------------------------------


def snapshot(reader: InMemoryMetricReader) -> dict[str, list[tuple[dict[str, Any], Any]]]:
    """Every metric's data points (one collection)."""
    found: dict[str, list[tuple[dict[str, Any], Any]]] = {}
    data = reader.get_metrics_data()
    for rm in data.resource_metrics if data else []:
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                points = found.setdefault(metric.name, [])
                points += [(dict(p.attributes or {}), p) for p in metric.data.data_points]
    return found


def total(snap: Mapping[str, Any], name: str, field: str = "value", **match: Any) -> float:
    """The sum of ``field`` over the points of ``name`` whose attributes include ``match``
    (keys without the ``saga.`` prefix)."""
    want = {f"saga.{k}": v for k, v in match.items()}
    return sum(
        float(getattr(p, field))
        for attrs, p in snap.get(name, [])
        if all(attrs.get(k) == v for k, v in want.items())
    )


def test_metrics_move_as_runs_progress(sdk: InMemoryMetricReader, engine: saga.Saga) -> None:
    saga_metrics.observe(engine)
    before = snapshot(sdk)
    run_id = engine.start_now(WORKFLOW, INPUT).run_id

    started = snapshot(sdk)
    assert total(started, "saga.outbox.backlog", queue="traced") == 1
    assert total(started, "saga.runs", workflow=WORKFLOW, state="running") == 1
    assert total(started, "saga.outbox.oldest_age", queue="traced") >= 0

    drive(engine, run_id)
    after = snapshot(sdk)

    def delta(name: str, field: str = "value", **match: Any) -> float:
        return total(after, name, field, **match) - total(before, name, field, **match)

    wf = {"workflow": WORKFLOW}
    assert delta("saga.step.attempts", step="charge", kind="step", **wf) == 2
    assert delta("saga.step.attempts", step="charge", outcome="retry_scheduled", **wf) == 1
    assert delta("saga.step.attempts", **wf) == len(EXPECTED_ATTEMPTS)
    assert delta("saga.step.failures", step="charge", **wf) == 1
    assert delta("saga.step.failures", step="ship", outcome="failed", **wf) == 1
    assert delta("saga.step.failures", step="reserve", **wf) == 0
    assert delta("saga.compensations", step="charge", outcome="completed", **wf) == 1
    assert delta("saga.compensations", step="reserve", outcome="completed", **wf) == 1
    assert delta("saga.step.duration", "count", step="reserve", kind="step", **wf) == 1
    assert delta("saga.step.duration", "count", **wf) == len(EXPECTED_ATTEMPTS)
    assert delta("saga.step.duration", "sum", **wf) > 0
    assert delta("saga.outbox.published", queue="traced", **wf) == len(EXPECTED_ATTEMPTS)
    assert delta("saga.outbox.publish_lag", "count", **wf) == len(EXPECTED_ATTEMPTS)

    # Gauges: the run is counted in its final state, nothing waits in the outbox.
    assert total(after, "saga.runs", workflow=WORKFLOW, state="compensated") == 1
    assert total(after, "saga.runs", workflow=WORKFLOW, state="running") == 0
    assert total(after, "saga.outbox.backlog", queue="traced") == 0

    saga_metrics.unobserve(engine)
    assert "saga.runs" not in snapshot(sdk)


# -- logs --------------------------------------------------------------------------------------


def test_engine_log_lines_carry_run_workflow_step_and_trace(
    sdk: InMemoryMetricReader, engine: saga.Saga, caplog: pytest.LogCaptureFixture
) -> None:
    with trace.get_tracer("tests").start_as_current_span("checkout"):
        run_id = engine.start_now(WORKFLOW, INPUT).run_id
    with caplog.at_level(logging.INFO, logger="saga"):
        drive(engine, run_id)
    failures = [r for r in caplog.records if r.name == "saga.worker" and "attempt failed" in r.msg]
    assert len(failures) == 2
    attempt_spans = {
        attempt_key(s): s for s in _spans.get_finished_spans()
        if s.attributes and "saga.outcome" in s.attributes
    }
    for record in failures:
        fields = record.saga  # type: ignore[attr-defined]
        assert fields["run_id"] == run_id
        assert fields["workflow"] == WORKFLOW
        assert fields["step"] in ("charge", "ship")
        span = attempt_spans[("step", fields["step"], fields["attempt"])]
        assert fields["trace_id"] == format(span.context.trace_id, "032x")
        assert fields["span_id"] == hexid(span.context.span_id)
        assert f"run_id={run_id}" in record.getMessage()

        doc = json.loads(JsonFormatter().format(record))
        assert doc["message"].startswith("attempt failed: ")
        assert "run_id=" not in doc["message"]
        assert doc["level"] == "WARNING" and doc["logger"] == "saga.worker"
        assert (doc["run_id"], doc["workflow"], doc["step"]) == (run_id, WORKFLOW, fields["step"])
        assert doc["trace_id"] == fields["trace_id"]


def test_json_formatter_handles_any_record() -> None:
    record = logging.LogRecord("app", logging.ERROR, __file__, 1, "plain %s", ("text",), None)
    try:
        raise ValueError("bad")
    except ValueError:
        record.exc_info = sys.exc_info()
    doc = json.loads(JsonFormatter().format(record))
    assert doc["message"] == "plain text"
    assert doc["level"] == "ERROR"
    assert "ValueError: bad" in doc["exception"]


# -- with real worker and relay processes ------------------------------------------------------


def read_spans(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_with_real_worker_and_relay_processes(
    sdk: InMemoryMetricReader,
    db_url: str,
    redis_url: str,
    supervisor: Supervisor,
    tmp_path: Path,
) -> None:
    queue = f"saga_{secrets.token_hex(4)}"
    span_file = tmp_path / "spans.jsonl"
    env = {
        "SAGA_DATABASE_URL": db_url,
        "SAGA_BROKER_URL": redis_url,
        "SAGA_TEST_QUEUE": queue,
        "SAGA_TEST_SPAN_FILE": str(span_file),
        "PYTHONUNBUFFERED": "1",
    }
    start_worker_and_relay(supervisor, queue, env)

    engine = saga.Saga(saga.Registry(*traced.workflows(queue)), database_url=db_url)
    try:
        with trace.get_tracer("tests").start_as_current_span("checkout") as root:
            run_id = engine.start_now(WORKFLOW, INPUT).run_id

        def finished() -> str | None:
            with engine.engine.connect() as conn:
                state = conn.execute(
                    text("SELECT state FROM saga.runs WHERE id = :id"), {"id": run_id}
                ).scalar_one()
            return state if state in FINISHED else None

        assert wait_until(finished, timeout=60, message="run did not finish") == "compensated"
    finally:
        engine.engine.dispose()

    def all_spans() -> list[dict[str, Any]] | None:
        spans = read_spans(span_file)
        attempts = [s for s in spans if "saga.outcome" in s["attributes"]]
        publishes = [s for s in spans if s["name"].startswith("saga publish ")]
        enough = len(attempts) >= len(EXPECTED_ATTEMPTS) and publishes
        return spans if enough else None

    spans = wait_until(all_spans, timeout=20, message="spans were not all written")
    assert spans is not None
    root_ctx = root.get_span_context()
    check_process_spans(
        spans, format(root_ctx.trace_id, "032x"), hexid(root_ctx.span_id), run_id
    )


def start_worker_and_relay(supervisor: Supervisor, queue: str, env: dict[str, str]) -> None:
    """A Celery worker (two forked children) on ``queue`` and a relay, both ready."""
    worker = [
        str(BIN / "celery"), "-A", "tests.apps.traced", "worker", "-Q", queue, "-c", "2",
        "--loglevel=INFO", "-n", f"traced-{queue}@%h",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
    ]
    supervisor.start("worker", worker, env=env, cwd=REPO)
    relay_code = (
        "import logging, sys; logging.basicConfig(level=logging.INFO); "
        f"from saga.relay import main; sys.exit(main({APP!r}))"
    )
    supervisor.start("relay", [sys.executable, "-c", relay_code], env=env, cwd=REPO)
    wait_until(lambda: " ready." in supervisor.log("worker"), timeout=60, message="worker ready")
    wait_until(lambda: "relay started" in supervisor.log("relay"), timeout=30, message="relay")


def check_process_spans(
    spans: list[dict[str, Any]], trace_id: str, root_id: str, run_id: str
) -> None:
    """One trace: publishes are children of the starting span, attempts of their publish."""
    assert {s["trace_id"] for s in spans} == {trace_id}

    publishes = {s["span_id"]: s for s in spans if s["name"].startswith("saga publish ")}
    attempts = [s for s in spans if "saga.outcome" in s["attributes"]]
    # The relay publishes the first steps and retries; with eager dispatch (the default) a
    # worker publishes the steps its completion made ready itself.
    assert "saga-relay" in {s["service"] for s in publishes.values()}
    assert {s["service"] for s in publishes.values()} <= {"saga-relay", "saga-worker"}
    assert {s["service"] for s in attempts} == {"saga-worker"}
    for publish in publishes.values():
        assert publish["kind"] == "PRODUCER"
        assert publish["parent_id"] == root_id

    def key(span: dict[str, Any]) -> tuple[str, str, int]:
        a = span["attributes"]
        return (a["saga.kind"], a["saga.step"], a["saga.attempt"])

    assert {key(s): s["attributes"]["saga.outcome"] for s in attempts} == EXPECTED_ATTEMPTS
    assert len(attempts) == len(EXPECTED_ATTEMPTS)
    for span in attempts:
        attrs = span["attributes"]
        assert span["kind"] == "CONSUMER"
        assert attrs["saga.workflow"] == WORKFLOW and attrs["saga.run_id"] == run_id
        # The headers came through Celery: an attempt whose message was published is a child
        # of that publish; one its worker chained in-process (no message) of the run's start.
        if span["parent_id"] != root_id:
            assert span["parent_id"] in publishes, span
            assert key(publishes[span["parent_id"]]) == key(span)
    assert any(s["parent_id"] in publishes for s in attempts)

    charge = sorted((s for s in attempts if key(s)[:2] == ("step", "charge")), key=key)
    assert [key(s)[2] for s in charge] == [1, 2]
    assert charge[0]["status"] == "ERROR"
    assert [e["attributes"]["exception.type"] for e in charge[0]["events"]] == ["RuntimeError"]
    ship = next(s for s in attempts if key(s) == ("step", "ship", 1))
    assert ship["status"] == "ERROR"
    assert ship["events"][0]["attributes"]["exception.type"].endswith("PermanentError")
