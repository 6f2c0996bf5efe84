"""Engine log lines that carry the run, workflow and step they concern.

Fields go both into the message (``key=value``, readable in any handler) and into the record's
``saga`` attribute (for structured handlers), with the current trace and span ids when there is
a span. :class:`JsonFormatter` writes such records (and any other) as one JSON object a line::

    handler = logging.StreamHandler()
    handler.setFormatter(saga.logs.JsonFormatter())
    logging.getLogger("saga").addHandler(handler)
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

_FIELDS = ("run_id", "workflow", "step", "kind", "attempt")


def trace_ids() -> dict[str, str]:
    """The current span's ``trace_id`` and ``span_id`` (hex), or nothing outside a span."""
    ctx = trace.get_current_span().get_span_context()
    if not ctx.is_valid:
        return {}
    return {"trace_id": format(ctx.trace_id, "032x"), "span_id": format(ctx.span_id, "016x")}


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` (run_id, workflow, step, ... first, then the rest)."""
    if not logger.isEnabledFor(level):
        return
    ordered = [k for k in _FIELDS if fields.get(k) is not None]
    ordered += sorted(k for k in fields if k not in _FIELDS and fields[k] is not None)
    suffix = " ".join(f"{k}={fields[k]}" for k in ordered)
    structured = {k: fields[k] for k in ordered} | trace_ids()
    logger.log(
        level,
        f"{message} {suffix}" if suffix else message,
        extra={"saga": structured, "saga_event": message},
    )


class JsonFormatter(logging.Formatter):
    """One JSON object per record: ``time`` (UTC ISO 8601), ``level``, ``logger``, ``message``,
    the saga fields (``run_id``, ``workflow``, ``step``, ``kind``, ``attempt``, ...,
    ``trace_id``, ``span_id``) and ``exception`` when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a JSON line."""
        event_message = getattr(record, "saga_event", None)
        doc: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": event_message if isinstance(event_message, str) else record.getMessage(),
        }
        fields = getattr(record, "saga", None)
        if isinstance(fields, Mapping):
            doc.update({k: v for k, v in fields.items() if k not in doc and v is not None})
        else:
            doc.update(trace_ids())
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            doc["stack"] = self.formatStack(record.stack_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


def describe(exc: BaseException, limit: int = 300) -> str:
    """``Type: message`` of an exception, bounded, for a log line (a failing ``__str__`` gives
    the type alone)."""
    try:
        text = str(exc)
    except Exception:
        text = ""
    name = type(exc).__name__
    return f"{name}: {text[:limit]}" if text else name
