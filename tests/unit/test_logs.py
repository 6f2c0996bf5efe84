"""Log lines: whatever a message or user code puts in a field is escaped and bounded, so one
event is one line."""

from __future__ import annotations

import io
import json
import logging
import sys
from collections.abc import Iterator

import pytest

from saga import logs

FORGED = "first\n[2026-01-01 00:00:00,000: CRITICAL/MainProcess] FAKE: database dropped"


@pytest.fixture
def capture() -> Iterator[tuple[logging.Logger, io.StringIO, logging.Handler]]:
    """A logger writing plain ``[time: LEVEL/process] message`` lines (as a Celery worker
    does) into a string."""
    out = io.StringIO()
    handler = logging.StreamHandler(out)
    line_format = "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s"
    handler.setFormatter(logging.Formatter(line_format))
    logger = logging.getLogger(f"saga.test.{id(out)}")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        yield logger, out, handler
    finally:
        logger.removeHandler(handler)


def test_a_step_name_with_a_newline_gives_one_line_and_forges_none(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, out, _ = capture

    logs.event(logger, logging.WARNING, "dropped a message for an unknown step", step=FORGED)

    lines = out.getvalue().splitlines()
    assert len(lines) == 1
    assert "step=first\\n[2026-01-01" in lines[0]
    assert not any(line.startswith("[2026-01-01 00:00:00,000: CRITICAL") for line in lines)


def test_control_characters_separators_and_surrogates_in_message_and_fields_are_escaped(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, out, _ = capture

    logs.event(
        logger, logging.WARNING, "attempt failed: a\rb\x00c\u2028d\x1b[31m",
        workflow="w\ud800", step="s\tt", attempt=3,
    )

    text = out.getvalue()
    assert len(text.splitlines()) == 1
    assert "a\\rb\\x00c\\u2028d\\x1b[31m" in text
    assert "workflow=w\\ud800" in text and "step=s\\tt" in text and "attempt=3" in text


def test_a_megabyte_message_and_field_are_cut_to_their_bounds(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, out, _ = capture

    logs.event(logger, logging.WARNING, "x" * 2**20, step="y" * 2**20)

    line = out.getvalue().rstrip("\n")
    assert len(line) < logs.MESSAGE_LIMIT + logs.FIELD_LIMIT + 200
    assert f"...[{2**20} chars in all]" in line


def test_the_json_formatter_writes_one_line_per_record_whatever_it_holds() -> None:
    formatter = logs.JsonFormatter()
    try:
        raise ValueError("multi\nline\u2029error")
    except ValueError:
        exc_info = sys.exc_info()
    record = logging.LogRecord(
        "celery", logging.ERROR, __file__, 1, "bad %s", ("arg\nwith\u2028\ud800",), exc_info
    )

    line = formatter.format(record)

    assert len(line.splitlines()) == 1
    doc = json.loads(line)
    assert doc["message"] == "bad arg\nwith\u2028\ud800"
    assert "multi\nline" in doc["exception"]


def test_the_json_formatter_keeps_a_saga_events_fields_escaped(
    capture: tuple[logging.Logger, io.StringIO, logging.Handler],
) -> None:
    logger, out, handler = capture
    handler.setFormatter(logs.JsonFormatter())

    logs.event(logger, logging.WARNING, "dropped", step=FORGED, attempt=2)

    [line] = out.getvalue().splitlines()
    doc = json.loads(line)
    assert doc["step"] == FORGED.replace("\n", "\\n")
    assert doc["attempt"] == 2
