"""Engine log lines that carry the run, workflow and step they concern.

Fields go both into the message (``key=value``, readable in any handler) and into the record's
``saga`` attribute (for structured handlers)."""

from __future__ import annotations

import logging
from typing import Any

_FIELDS = ("run_id", "workflow", "step", "kind", "attempt")


def event(logger: logging.Logger, level: int, message: str, **fields: Any) -> None:
    """Log ``message`` with ``fields`` (run_id, workflow, step, ... first, then the rest)."""
    if not logger.isEnabledFor(level):
        return
    ordered = [k for k in _FIELDS if fields.get(k) is not None]
    ordered += sorted(k for k in fields if k not in _FIELDS and fields[k] is not None)
    suffix = " ".join(f"{k}={fields[k]}" for k in ordered)
    logger.log(level, f"{message} {suffix}" if suffix else message, extra={"saga": fields})
