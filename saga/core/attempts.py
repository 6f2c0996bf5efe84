"""Shared vocabulary of attempts: what a message names, its idempotency keys, and what the
engine knows of a step's outcome when it comes to undo it."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

OUTCOMES = ("completed", "failed", "unknown")
"""What a compensation is told of the step it undoes:

- ``completed``: the step's code returned and its result was recorded;
- ``failed``: its code raised (it may still have had part of its effect);
- ``unknown``: the engine lost track of it (its worker died, it ran past its time limit, its
  result could not be stored): assume the effect happened, and look it up by the step's
  idempotency key.
"""


@dataclass(frozen=True)
class AttemptRef:
    """One attempt of one step (or compensation) of one run: what a message names."""

    run_id: str
    kind: str
    step: str
    attempt: int

    @property
    def idempotency_key(self) -> str:
        """The same for every attempt of this step (or compensation) of this run."""
        return idempotency_key(self.run_id, self.kind, self.step)

    @property
    def step_idempotency_key(self) -> str:
        """The idempotency key of the step itself (for a compensation: of the step it undoes)."""
        return idempotency_key(self.run_id, "step", self.step)


def idempotency_key(run_id: str, kind: str, step: str) -> str:
    """``run:kind:step``: the key every attempt of that step of that run shares."""
    return f"{run_id}:{kind}:{step}"


def outcome_of(state: str, error: Mapping[str, Any] | None) -> str:
    """What is known of a step that is undone, from its row's ``state`` and last ``error``."""
    if state == "completed":
        return "completed"
    if error is not None and error.get("outcome") == "unknown":
        return "unknown"
    return "failed"
