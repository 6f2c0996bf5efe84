"""How an exception's text is made safe to store and to log, and the stored error document."""

from __future__ import annotations

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from saga import telemetry
from saga.errors import UnstorableResultError, error_document, exception_text


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no")


@pytest.mark.parametrize(
    ("exc", "text"),
    [
        (ValueError("bad\x00byte"), "badbyte"),
        (ValueError("caf\ud800"), "caf\ufffd"),
        (UnprintableError(), "UnprintableError (its __str__ raised RuntimeError)"),
    ],
)
def test_exception_text_is_storable(exc: BaseException, text: str) -> None:
    assert exception_text(exc) == text


def test_exception_text_is_bounded() -> None:
    text = exception_text(ValueError("x" * 2**20))

    assert len(text) == 2000 and text.endswith("...")


def test_an_unstorable_result_is_marked_as_an_unknown_outcome_and_other_errors_are_not() -> None:
    unstorable = error_document(UnstorableResultError("NUL byte at result['s']"), 2)
    ordinary = error_document(ValueError("bad\x00byte"), 1)

    assert unstorable == {
        "type": "saga.errors.UnstorableResultError",
        "message": "the step's result is not storable: NUL byte at result['s']",
        "attempt": 2,
        "outcome": "unknown",
    }
    assert ordinary == {"type": "builtins.ValueError", "message": "badbyte", "attempt": 1}


def test_an_exception_whose_str_raises_is_recorded_on_the_attempts_span() -> None:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))

    with provider.get_tracer("test").start_as_current_span("attempt"):
        telemetry.record_exception(UnprintableError())

    [span] = exporter.get_finished_spans()
    assert span.status.description == (
        "UnprintableError: UnprintableError (its __str__ raised RuntimeError)"
    )
    [recorded] = span.events
    assert recorded.name == "exception"
    assert recorded.attributes is not None
    assert str(recorded.attributes["exception.type"]).endswith("UnprintableError")
