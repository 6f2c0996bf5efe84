"""Stored tracebacks: the step's own frames with file and line, bounded and sanitised."""

from __future__ import annotations

import json
from typing import Any

from saga.context import StepContext
from saga.steps.function import FunctionStep
from saga.tracebacks import MAX_BYTES, capture, clean, render


def _ctx() -> StepContext:
    return StepContext(
        run_id="r", workflow="wf", step="charge", kind="step", attempt=1, input={},
        results={}, idempotency_key="k", business_key=None, step_result=None,
    )


def charge_card(ctx: StepContext) -> Any:
    raise ValueError("card declined")


def _caught(fn: Any, *args: Any) -> BaseException:
    try:
        fn(*args)
    except Exception as exc:
        return exc
    raise AssertionError("did not raise")


def test_the_steps_own_frame_is_kept_with_its_file_line_and_code_and_saga_frames_are_not() -> None:
    exc = _caught(FunctionStep(charge_card).run, _ctx(), None)
    doc = capture(exc)
    frames = doc["frames"]
    assert frames[-1]["function"] == "charge_card"
    assert frames[-1]["file"] == "tests/unit/test_tracebacks.py"
    assert frames[-1]["code"] == 'raise ValueError("card declined")'
    assert frames[-1]["own"] is True
    assert not any(f["file"].startswith("saga/") for f in frames)
    assert isinstance(frames[-1]["line"], int)


def _recurse(n: int) -> None:
    if n == 0:
        raise RuntimeError("deep")
    _recurse(n - 1)


def test_a_deep_stack_is_bounded_in_bytes_and_keeps_the_innermost_frame() -> None:
    doc = capture(_caught(_recurse, 500))
    assert len(json.dumps(doc).encode()) <= MAX_BYTES
    assert doc["omitted"] > 400
    assert doc["frames"][-1]["code"] == 'raise RuntimeError("deep")'


def test_a_tiny_budget_still_gives_one_frame_within_it() -> None:
    doc = capture(_caught(_recurse, 50), max_bytes=400)
    assert len(json.dumps(doc).encode()) <= 400
    assert len(doc["frames"]) >= 1


def test_control_characters_are_escaped_and_long_text_is_cut() -> None:
    assert clean("red\x1b[31m\nnext", 100) == "red\\x1b[31m\\nnext"
    assert len(clean("x" * 500, 80)) == 80


def test_no_local_values_are_stored() -> None:
    def fails(password: str) -> None:
        token = password.upper()
        raise ValueError("refused" + token[:0])

    doc = capture(_caught(fails, "hunter2-password"))
    assert "HUNTER2" not in json.dumps(doc) and "hunter2" not in json.dumps(doc)


def test_the_cause_of_a_chained_exception_is_kept() -> None:
    def chained() -> None:
        try:
            {}["missing"]
        except KeyError as exc:
            raise RuntimeError("lookup failed") from exc

    doc = capture(_caught(chained))
    assert doc["cause"]["type"] == "KeyError"
    assert "missing" in doc["cause"]["message"]


def test_render_shows_frames_like_python_and_copes_with_a_string_or_nothing() -> None:
    doc = capture(_caught(FunctionStep(charge_card).run, _ctx(), None))
    lines = render(doc)
    assert any(line.startswith('> File "tests/unit/test_tracebacks.py", line ') for line in lines)
    assert any("in charge_card" in line for line in lines)
    assert render(None) == []
    assert render("Traceback (most recent call last):\n  boom") == [
        "Traceback (most recent call last):",
        "  boom",
    ]
