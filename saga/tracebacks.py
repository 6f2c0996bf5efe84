"""A failed attempt's traceback, bounded and sanitised for storing in its error document.

:func:`capture` turns an exception into a small JSON document: the frames (file, line,
function and the source line) from the step's own code inwards, saga's own frames around the
step left out, each string cut and stripped of control characters, no local variables (they may
hold secrets), the whole a few KB at most. The step's own frames are kept first: when the stack
is deep, frames of libraries in the middle go before the step's. :func:`render` prints one
document (or a plain string stored by an older version) the way Python prints a traceback.
"""

from __future__ import annotations

import json
import os
import sys
import sysconfig
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

MAX_BYTES = 4096
"""The largest a stored traceback document may be, as JSON."""
MAX_FRAMES = 30
_TEXT = {"file": 160, "function": 80, "code": 160}
_SAGA_DIR = str(Path(__file__).resolve().parent) + os.sep
_LIBRARY_DIRS = tuple(
    {
        str(Path(p).resolve()) + os.sep
        for key in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(key))
    }
)


def clean(text: object, limit: int) -> str:
    """``text`` with control characters escaped, cut to ``limit`` characters."""
    out = "".join(
        ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii")
        for ch in str(text)
    )
    return out if len(out) <= limit else out[: limit - 1] + "…"


def _short_path(path: str) -> str:
    """A path without the machine's layout: relative to the working directory, or from the
    installed package's directory (``site-packages/...``) for libraries."""
    try:
        resolved = str(Path(path).resolve())
    except (OSError, ValueError):
        return path
    cwd = os.getcwd() + os.sep
    if resolved.startswith(_SAGA_DIR):
        return "saga/" + resolved[len(_SAGA_DIR) :]
    for marker in ("site-packages" + os.sep, "dist-packages" + os.sep):
        if marker in resolved:
            return resolved[resolved.index(marker) :]
    if resolved.startswith(cwd):
        return resolved[len(cwd) :]
    return resolved


def _kind_of(path: str) -> str:
    """``saga`` (saga's own code), ``library`` (stdlib and installed packages) or ``own``."""
    try:
        resolved = str(Path(path).resolve())
    except (OSError, ValueError):
        return "own"
    if resolved.startswith(_SAGA_DIR):
        return "saga"
    if resolved.startswith(_LIBRARY_DIRS) or "site-packages" in resolved:
        return "library"
    return "own"


def _frames(exc: BaseException) -> list[dict[str, Any]]:
    summary = traceback.extract_tb(exc.__traceback__)
    frames = [
        {
            "file": clean(_short_path(f.filename), _TEXT["file"]),
            "line": f.lineno,
            "function": clean(f.name, _TEXT["function"]),
            "code": clean((f.line or "").strip(), _TEXT["code"]),
            "own": _kind_of(f.filename) == "own",
            "_saga": _kind_of(f.filename) == "saga",
        }
        for f in summary
    ]
    # saga's frames around the step (the executor, the time limit, the step runner) say
    # nothing about the failure: they are left out, except those innermost of all (an error
    # raised in saga itself, say by a Celery task step).
    last_outside = max((i for i, f in enumerate(frames) if not f["_saga"]), default=-1)
    kept = [f for i, f in enumerate(frames) if not f["_saga"] or i > last_outside]
    for f in kept:
        del f["_saga"]
    return kept


def _shrink(frames: list[dict[str, Any]], keep: int) -> tuple[list[dict[str, Any]], int]:
    """At most ``keep`` frames: the innermost one, then the step's own frames, then the
    others nearest the failure; order kept. Returns the frames and how many were left out."""
    if len(frames) <= keep:
        return frames, 0
    last = len(frames) - 1
    ranked = sorted(range(len(frames)), key=lambda i: (i != last, not frames[i]["own"], -i))
    chosen = sorted(ranked[:keep])
    return [frames[i] for i in chosen], len(frames) - len(chosen)


def _size(doc: dict[str, Any]) -> int:
    return len(json.dumps(doc, ensure_ascii=False).encode())


def capture(
    exc: BaseException, *, max_bytes: int = MAX_BYTES, max_frames: int = MAX_FRAMES
) -> dict[str, Any]:
    """The stored form of ``exc``'s traceback: ``{"frames": [{"file", "line", "function",
    "code", "own"}, ...], "omitted": n}`` outermost first, plus ``"cause"`` (type and message
    of the exception it was raised from, if any). Never larger than ``max_bytes`` as JSON."""
    frames, omitted = _shrink(_frames(exc), max_frames)
    doc: dict[str, Any] = {"frames": frames, "omitted": omitted}
    cause = exc.__cause__ or (None if exc.__suppress_context__ else exc.__context__)
    if cause is not None:
        doc["cause"] = {
            "type": clean(type(cause).__qualname__, 100),
            "message": clean(cause, 300),
        }
    while _size(doc) > max_bytes and len(doc["frames"]) > 1:
        doc["frames"], more = _shrink(doc["frames"], len(doc["frames"]) - 1)
        doc["omitted"] += more
    if _size(doc) > max_bytes:  # one frame with long strings: cut them harder
        for f in doc["frames"]:
            f["file"], f["code"] = clean(f["file"], 60), clean(f["code"], 60)
        doc.pop("cause", None)
    return doc


def current(max_bytes: int = MAX_BYTES) -> dict[str, Any] | None:
    """:func:`capture` of the exception being handled, or ``None`` outside an ``except``."""
    exc = sys.exc_info()[1]
    return None if exc is None else capture(exc, max_bytes=max_bytes)


def render(doc: object) -> list[str]:
    """Lines showing a stored traceback as Python would (``File "f", line n, in fn``); the
    step's own frames are marked ``>``. Accepts a plain string, and ``None`` (no lines)."""
    if doc is None:
        return []
    if isinstance(doc, str):
        return [clean(line, 300) for line in doc.splitlines()]
    if not isinstance(doc, dict):
        return [clean(doc, 300)]
    frames: Sequence[Any] = doc.get("frames") or []
    lines: list[str] = []
    for f in frames:
        if not isinstance(f, dict):
            continue
        mark = ">" if f.get("own") else " "
        lines.append(
            f'{mark} File "{clean(f.get("file", "?"), 200)}", line {f.get("line")}, '
            f"in {clean(f.get('function', '?'), 100)}"
        )
        if f.get("code"):
            lines.append(f"      {clean(f['code'], 200)}")
    if doc.get("omitted"):
        lines.append(f"  ({doc['omitted']} frame(s) left out)")
    cause = doc.get("cause")
    if isinstance(cause, dict):
        lines.append(
            f"  raised from {clean(cause.get('type', '?'), 100)}: "
            f"{clean(cause.get('message', ''), 300)}"
        )
    return lines
