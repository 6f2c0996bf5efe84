"""Engine log lines that carry the run, workflow and step they concern.

Fields go both into the message (``key=value``, readable in any handler) and into the record's
``saga`` attribute (for structured handlers), with the current trace and span ids when there is
a span. :class:`JsonFormatter` writes such records (and any other) as one JSON object a line::

    handler = logging.StreamHandler()
    handler.setFormatter(saga.logs.JsonFormatter())
    logging.getLogger("saga").addHandler(handler)

Whatever goes into a line may come from a broker message or from user code (a step name, an
exception's text), so every string is escaped (no raw newline or control character: one record
is one line) and bounded (:data:`MESSAGE_LIMIT`, :data:`FIELD_LIMIT` characters).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from saga.errors import exception_text

_FIELDS = ("run_id", "workflow", "step", "kind", "attempt")
MESSAGE_LIMIT = 2000
"""Characters of a log message kept (the rest is replaced by a note of how much was cut)."""
FIELD_LIMIT = 200
"""Characters of one field's value kept."""
RECORD_LIMIT = 16_000
"""Characters of a :class:`JsonFormatter` record's message, exception or stack kept."""

# C0 and C1 controls, DEL, the Unicode line and paragraph separators (str.splitlines and many
# log viewers break lines on them) and lone surrogates (they cannot be written as UTF-8).
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape_char(match: re.Match[str]) -> str:
    char = match.group()
    named = _NAMED.get(char)
    if named:
        return named
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def safe_str(value: object) -> str:
    """``str(value)``, or ``<unprintable TYPE>`` when its ``__str__`` raises."""
    if isinstance(value, str):
        return value
    try:
        return str(value)
    except Exception:
        return f"<unprintable {type(value).__qualname__}>"


def clean(value: object, limit: int = FIELD_LIMIT) -> str:
    """``value`` as text fit for one log line: control characters, line separators and lone
    surrogates escaped (``\\n``, ``\\x00``, ``\\ud800``), at most ``limit`` characters, with a
    note of how many were cut."""
    text = safe_str(value)
    escaped = _UNSAFE.sub(_escape_char, text[:limit])
    if len(escaped) <= limit and len(text) <= limit:
        return escaped
    return f"{escaped[:limit]}...[{len(text)} chars in all]"


def trace_ids() -> dict[str, str]:
    """The current span's ``trace_id`` and ``span_id`` (hex), or nothing outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def _field(value: Any) -> Any:
    """A field's value for a record: numbers and booleans as they are, the rest cleaned."""
    if isinstance(value, bool | int | float):
        return value
    return clean(value)


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` (run_id, workflow, step, ... first, then the rest), each
    escaped and bounded."""
    if not logger.isEnabledFor(level):
        return
    ordered = [k for k in _FIELDS if fields.get(k) is not None]
    ordered += sorted(k for k in fields if k not in _FIELDS and fields[k] is not None)
    structured = {k: _field(fields[k]) for k in ordered}
    text = clean(message, MESSAGE_LIMIT)
    suffix = " ".join(f"{k}={structured[k]}" for k in ordered)
    logger.log(
        level,
        f"{text} {suffix}" if suffix else text,
        extra={"saga": structured | trace_ids(), "saga_event": text},
    )


def _bounded(text: str) -> str:
    if len(text) <= RECORD_LIMIT:
        return text
    return f"{text[:RECORD_LIMIT]}...[{len(text)} chars in all]"


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    the saga fields (``run_id``, ``workflow``, ``step``, ``kind``, ``attempt``, ...,
    ``trace_id``, ``span_id``) and ``exception`` when there is one. Always one line: JSON
    escapes control characters, and the line separators U+2028/U+2029 and lone surrogates are
    escaped too; message, exception and stack are bounded (:data:`RECORD_LIMIT`)."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        event_message = getattr(record, "saga_event", None)
        if isinstance(event_message, str):
            message = event_message
        else:
            try:
                message = record.getMessage()
            except Exception:  # a bad %-format or an argument whose __str__ raises
                message = f"{safe_str(record.msg)} (unformattable arguments)"
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": _bounded(message),
        }
        fields = getattr(record, "saga", None)
        if isinstance(fields, Mapping):
            doc.update({k: v for k, v in fields.items() if k not in doc and v is not None})
        else:
            doc.update(trace_ids())
        if record.exc_info:
            doc["exception"] = _bounded(self.formatException(record.exc_info))
        if record.stack_info:
            doc["stack"] = _bounded(self.formatStack(record.stack_info))
        line = json.dumps(doc, default=safe_str, ensure_ascii=False)
        line = line.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")
        # A lone surrogate becomes its JSON escape (\udXXX), which any JSON reader accepts.
        return line.encode("utf-8", "backslashreplace").decode("utf-8")


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: text`` of an exception for a log line: its text as
    :func:`saga.errors.exception_text` gives it (storable, at most ``limit`` characters, and
    when its ``__str__`` raises, saying so instead)."""
    text = exception_text(exc, limit)
    name = type(exc).__name__
    return f"{name}: {text}" if text else name
