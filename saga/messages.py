"""The messages the relay publishes: frozen values, validated on the way in."""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from saga.core.attempts import AttemptRef

KINDS = ("step", "compensation")
INT4_MAX = 2**31 - 1
"""The largest version or attempt number a message may carry (PostgreSQL ``integer``)."""
NAME_LIMIT = 200
"""The longest workflow or step name a message may carry."""


class MalformedMessageError(ValueError):
    """A message that is not a saga step message (its text may quote the message: log it
    with :func:`saga.logs.event`, which escapes and bounds it)."""


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
        """Validate a message body; :class:`MalformedMessageError` says what is wrong. Every
        value is checked for type and range (names are bounded strings, numbers fit a
        PostgreSQL ``integer``), so nothing malformed reaches the database."""
        if not isinstance(body, Mapping):
            raise MalformedMessageError(f"body is a {type(body).__name__}, not an object")
        unknown = set(body) - {
            "run_id", "workflow", "version", "kind", "step", "attempt", "definition",
        }
        if unknown:
            names = sorted(str(k) for k in unknown)
            raise MalformedMessageError(f"unknown fields {names}")
        missing = sorted({"run_id", "workflow", "version", "kind", "step", "attempt"} - set(body))
        if missing:
            raise MalformedMessageError(f"bad or missing field: {missing}")
        raw_id, workflow, step, kind = body["run_id"], body["workflow"], body["step"], body["kind"]
        version, attempt = body["version"], body["attempt"]
        try:
            if not isinstance(raw_id, str):
                raise ValueError("not a string")
            run_id = str(uuid.UUID(raw_id))
        except ValueError:
            raise MalformedMessageError("bad or missing field: run_id is not a UUID") from None
        for name, value in (("workflow", workflow), ("step", step)):
            if not isinstance(value, str) or not 0 < len(value) <= NAME_LIMIT:
                raise MalformedMessageError(f"{name} must be a string of 1-{NAME_LIMIT} chars")
        if kind not in KINDS:
            raise MalformedMessageError("kind must be step or compensation")
        for name, value in (("version", version), ("attempt", attempt)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= INT4_MAX:
                raise MalformedMessageError(f"{name} must be an int from 1 to {INT4_MAX}")
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
    """Puts step messages on the broker."""

    def publish(self, envelope: Envelope) -> None:
        """Publish one message or raise."""
        ...


@runtime_checkable
class BatchPublisher(Publisher, Protocol):
    """A publisher that can put many messages on the broker in one go (the relay uses it when
    it can)."""

    def publish_many(self, envelopes: Sequence[Envelope]) -> tuple[int, Exception | None]:
        """Publish in order; how many went out, and the error that stopped the rest."""
        ...


def publish_in_order(
    publisher: Publisher, envelopes: Sequence[Envelope]
) -> tuple[int, Exception | None]:
    """Publish in order (in one go when the publisher can): how many went out, and the error
    that stopped the rest."""
    if isinstance(publisher, BatchPublisher):
        return publisher.publish_many(envelopes)
    for sent, envelope in enumerate(envelopes):
        try:
            publisher.publish(envelope)
        except Exception as exc:
            return sent, exc
    return len(envelopes), None
