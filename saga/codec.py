"""JSON in and out of the database: strict (no NaN, no pickle-able extras), storable by
PostgreSQL (no NUL byte, no lone surrogate, nesting at most :data:`MAX_DEPTH` deep) and
size-limited.

:func:`check_storable` is the one check for whatever a caller hands saga to store (a run's
input, its business key, a signal's payload); it walks the value without recursion, so no
input can exhaust the stack, and names the first bad place by its path, such as
``input['items'][3]['sku']``.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

from saga.errors import InputError, UnstorableResultError

MAX_DEPTH = 100
"""How many levels of lists and objects a stored value may nest (``{"a": [1]}`` is 2)."""
MAX_INT_BITS = 13_000
"""Integers beyond this many bits (about 3,900 digits) are refused: Python will not turn an
integer of over 4,300 digits into text, so it could not be written as JSON."""
_PATH_KEY_LIMIT = 60
_SURROGATE = re.compile("[\ud800-\udfff]")

# A path is a linked list (parent, segment), rendered only when something is wrong.
_Path = tuple[Any, str] | None


def _render(root: str, node: _Path) -> str:
    parts: list[str] = []
    while node is not None:
        node, segment = node
        parts.append(segment)
    parts.reverse()
    if len(parts) > 12:  # a deep path: its first and last steps say enough
        parts = [*parts[:5], f"[...{len(parts) - 10} more...]", *parts[-5:]]
    return root + "".join(parts)


def _segment(key: object) -> str:
    text = repr(key)
    if len(text) > _PATH_KEY_LIMIT:
        text = text[: _PATH_KEY_LIMIT - 4] + "...'"
    return f"[{text}]"


def _text_problem(text: str) -> str | None:
    if "\x00" in text:
        return "NUL byte"
    if not text.isascii():
        found = _SURROGATE.search(text)
        if found:
            return f"lone surrogate {found.group()!r}"
    return None


def problem(value: Any, root: str, max_depth: int = MAX_DEPTH) -> tuple[str, str] | None:
    """The path and reason of the first place in ``value`` that is not storable JSON, or
    ``None`` when all of it is. Iterative: any depth of nesting is safe to check."""
    # (value, depth, path, its key when it is an object's member, whether it is one)
    stack: list[tuple[Any, int, _Path, object, bool]] = [(value, 0, None, None, False)]
    while stack:
        item, depth, node, key, member = stack.pop()
        if member:
            if not isinstance(key, str):
                parent = node[0] if node is not None else None
                return _render(root, parent), f"key {key!r} is not a string"
            reason = _text_problem(key)
            if reason:
                return _render(root, node), f"{reason} in a key"
        if item is None or isinstance(item, bool):
            continue
        if isinstance(item, str):
            reason = _text_problem(item)
            if reason:
                return _render(root, node), reason
            continue
        if isinstance(item, int):
            if item.bit_length() > MAX_INT_BITS:
                return _render(root, node), "integer too large for JSON"
            continue
        if isinstance(item, float):
            if not math.isfinite(item):
                return _render(root, node), f"{item} is not valid JSON"
            continue
        if isinstance(item, list | tuple | dict):
            if depth >= max_depth:
                return _render(root, node), f"nested more than {max_depth} levels deep"
            if isinstance(item, dict):
                children = [
                    (v, depth + 1, (node, _segment(k)), k, True) for k, v in item.items()
                ]
            else:
                children = [
                    (v, depth + 1, (node, f"[{i}]"), None, False) for i, v in enumerate(item)
                ]
            children.reverse()  # popped in document order
            stack.extend(children)
            continue
        return _render(root, node), f"a {type(item).__name__} is not JSON-serializable"
    return None


def check_storable(value: Any, *, workflow: str, field: str) -> None:
    """Refuse, with an :class:`InputError` naming the path (``input['items'][3]['sku']``),
    a value PostgreSQL could not store as JSON: not JSON, a NUL byte or a lone surrogate in a
    string or key, nesting deeper than :data:`MAX_DEPTH`. For run input, business keys and
    signal payloads, before anything is sent to the database."""
    found = problem(value, field)
    if found:
        raise InputError(workflow, found[0], found[1])


def _dumps(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode(value: Any, *, workflow: str, field: str, limit: int) -> str:
    """``value`` as compact JSON text, or :class:`InputError` naming ``field`` (and the path
    inside it) if it is not storable JSON or is larger than ``limit`` bytes."""
    check_storable(value, workflow=workflow, field=field)
    text = _dumps(value)
    size = len(text.encode())
    if size > limit:
        raise InputError(workflow, field, f"is {size} bytes of JSON, over the limit of {limit}")
    return text


def encode_result(value: Any, *, limit: int) -> str:
    """A step's result as compact JSON text, or :class:`~saga.errors.UnstorableResultError`
    (``the step's result is not storable: NUL byte at result['s']``)."""
    found = problem(value, "result")
    if found:
        raise UnstorableResultError(f"{found[1]} at {found[0]}")
    text = _dumps(value)
    size = len(text.encode())
    if size > limit:
        raise UnstorableResultError(f"it is {size} bytes of JSON, over the limit of {limit}")
    return text


def dumps(value: Any) -> str:
    """Compact JSON for values saga builds itself (errors, routes)."""
    return json.dumps(value, separators=(",", ":"), default=str)
