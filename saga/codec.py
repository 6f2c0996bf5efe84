"""JSON in and out of the database: strict (no NaN, no pickle-able extras) and size-limited."""

from __future__ import annotations

import json
import math
from typing import Any

from saga.errors import InputError


def _first_bad(value: Any, path: str) -> tuple[str, str] | None:
    """The path and reason of the first value ``json.dumps`` would refuse or mangle."""
    if value is None or isinstance(value, bool | int | str):
        return None
    if isinstance(value, float):
        return None if math.isfinite(value) else (path, f"{value} is not valid JSON")
    if isinstance(value, list | tuple):
        for i, item in enumerate(value):
            found = _first_bad(item, f"{path}[{i}]")
            if found:
                return found
        return None
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                return (path, f"key {key!r} is not a string")
            found = _first_bad(item, f"{path}[{key!r}]")
            if found:
                return found
        return None
    return (path, f"a {type(value).__name__} is not JSON-serializable")


def encode(value: Any, *, workflow: str, field: str, limit: int) -> str:
    """``value`` as compact JSON text, or :class:`InputError` naming ``field`` if it is not JSON
    or is larger than ``limit`` bytes."""
    bad = _first_bad(value, field)
    if bad:
        raise InputError(workflow, bad[0], bad[1])
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    size = len(text.encode())
    if size > limit:
        raise InputError(workflow, field, f"is {size} bytes of JSON, over the limit of {limit}")
    return text


def dumps(value: Any) -> str:
    """Compact JSON for values saga builds itself (errors, routes)."""
    return json.dumps(value, separators=(",", ":"), default=str)
