"""The messages the relay publishes: frozen values, validated on the way in."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from saga.core.attempts import AttemptRef

KINDS = ("step", "compensation")


class MalformedMessageError(ValueError):
    """A message that is not a saga step message."""


@dataclass(frozen=True)
class StepMessage:
    """What the relay publishes for one attempt; built only from registered workflows."""

    run_id: str
    workflow: str
    version: int
    kind: str
    step: str
    attempt: int
    definition: str | None = None
    """The hash of the run's workflow definition, so a worker without it can tell before it
    claims anything (absent in messages of older relays)."""

    @classmethod
    def parse(cls, body: Mapping[str, Any]) -> StepMessage:
        """Validate a message body; :class:`MalformedMessageError` says what is wrong."""
        if not isinstance(body, Mapping):
            raise MalformedMessageError(f"body is a {type(body).__name__}, not an object")
        unknown = set(body) - {
            "run_id", "workflow", "version", "kind", "step", "attempt", "definition",
        }
        if unknown:
            raise MalformedMessageError(f"unknown fields {sorted(unknown)}")
        try:
            run_id = str(uuid.UUID(str(body["run_id"])))
            workflow, step, kind = body["workflow"], body["step"], body["kind"]
            version, attempt = body["version"], body["attempt"]
        except (KeyError, ValueError) as exc:
            raise MalformedMessageError(f"bad or missing field: {exc}") from None
        if not isinstance(workflow, str) or not isinstance(step, str) or kind not in KINDS:
            raise MalformedMessageError("workflow and step must be strings, kind step|compensation")
        for name, value in (("version", version), ("attempt", attempt)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise MalformedMessageError(f"{name} must be an int >= 1")
        definition = body.get("definition")
        if definition is not None and (not isinstance(definition, str) or len(definition) > 64):
            raise MalformedMessageError("definition must be a string of up to 64 characters")
        return cls(run_id, workflow, version, kind, step, attempt, definition)

    @property
    def ref(self) -> AttemptRef:
        """The attempt this message names."""
        return AttemptRef(self.run_id, self.kind, self.step, self.attempt)

    def as_body(self) -> dict[str, Any]:
        """The message body."""
        body: dict[str, Any] = {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "version": self.version,
            "kind": self.kind,
            "step": self.step,
            "attempt": self.attempt,
        }
        if self.definition is not None:
            body["definition"] = self.definition
        return body


@dataclass(frozen=True)
class Envelope:
    """A step message with how to deliver it, as the relay hands it to a publisher."""

    message: StepMessage
    queue: str
    priority: int | None = None
    time_limit: float | None = None
    countdown: float | None = None
    headers: Mapping[str, str] | None = None

    @classmethod
    def from_outbox(cls, row: Mapping[str, Any], headers: Mapping[str, str] | None) -> Envelope:
        """The envelope of an outbox row joined with its run: ids and names only, so nothing
        in a run's input can add callbacks, links or task names."""
        message = StepMessage(
            run_id=row["run_id"],
            workflow=row["workflow"],
            version=row["version"],
            kind=row["kind"],
            step=row["step"],
            attempt=row["attempt"],
            definition=row.get("definition_hash"),
        )
        countdown = row["countdown"] if row["countdown"] and row["countdown"] > 0 else None
        return cls(message, row["queue"], row["priority"], row["time_limit"], countdown, headers)


class Publisher(Protocol):
    """Puts one step message on the broker, or raises."""

    def publish(self, envelope: Envelope) -> None:
        """Publish or raise."""
        ...
