"""Step messages are validated field by field: whatever arrives, it is a StepMessage or a
MalformedMessageError, never a value the database refuses later."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from saga.messages import INT4_MAX, MalformedMessageError, StepMessage


def body(**changes: Any) -> dict[str, Any]:
    return {
        "run_id": str(uuid.uuid4()), "workflow": "w", "version": 1, "kind": "step",
        "step": "a", "attempt": 1, **changes,
    }


def test_a_valid_body_parses() -> None:
    msg = StepMessage.parse(body(attempt=INT4_MAX))

    assert msg.attempt == INT4_MAX and msg.kind == "step"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"attempt": 10**30}, "attempt must be an int from 1 to 2147483647"),
        ({"attempt": INT4_MAX + 1}, "attempt must be an int"),
        ({"version": 2**40}, "version must be an int"),
        ({"attempt": 0}, "attempt must be an int"),
        ({"attempt": True}, "attempt must be an int"),
        ({"attempt": 1.0}, "attempt must be an int"),
        ({"run_id": 12}, "run_id is not a UUID"),
        ({"run_id": "not-a-uuid"}, "run_id is not a UUID"),
        ({"step": "s" * 201}, "step must be a string of 1-200 chars"),
        ({"workflow": ["w"]}, "workflow must be a string"),
        ({"kind": ["step"]}, "kind must be step or compensation"),
        ({"extra": 1}, "unknown fields ['extra']"),
    ],
)
def test_a_bad_field_is_a_malformed_message(changes: dict[str, Any], fragment: str) -> None:
    with pytest.raises(MalformedMessageError) as caught:
        StepMessage.parse(body(**changes))

    assert fragment in str(caught.value)


def test_a_missing_field_is_a_malformed_message() -> None:
    incomplete = body()
    del incomplete["attempt"]

    with pytest.raises(MalformedMessageError, match="attempt"):
        StepMessage.parse(incomplete)
