"""Engine settings, a validated value read from arguments or the environment."""

from __future__ import annotations

import os
from dataclasses import dataclass

from saga.db.migrate import check_schema_name


def _flag(value: str) -> bool:
    if value.lower() in ("1", "true", "yes", "on"):
        return True
    if value.lower() in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected a boolean, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """Tunables of one engine. Durations are in seconds.

    A running attempt holds a lease of ``heartbeat_timeout`` seconds, renewed by its worker's
    heartbeat (every third of it) while the attempt runs: a dead worker's attempt is retried
    that long after its last beat, whatever the step's time limit. The heartbeat renews a lease
    for at most the step's time limit plus ``lease_grace``, so an attempt that ignores its time
    limit (a thread stuck in a C call) is given up then. ``republish_after`` is how long a
    published message may wait for a worker before the sweeper publishes it again (the broker
    may have lost it); each further time waits eight times longer. With
    ``eager_dispatch`` a worker publishes the steps its completion made ready itself, right
    after the commit, instead of waiting for the relay; the outbox row stays the fallback.

    A worker that completes a step and so makes ready a step of the same run on a queue it
    consumes claims that step in the same transaction and runs it at once, in-process (no
    broker round trip, no outbox row), for at most ``chain_steps`` steps or ``chain_seconds``
    seconds of one delivery (``chain_steps=0`` turns it off); then the next one goes out
    through the broker, so that one long run cannot hold a worker.

    A caller waiting on a run (:meth:`~saga.handles.RunHandle.wait`) is woken by the database's
    notification, and reads the run every ``wait_poll_interval`` seconds as well in case one
    was lost.
    """

    schema: str = "saga"
    max_input_bytes: int = 256 * 1024
    max_result_bytes: int = 256 * 1024
    lease_grace: float = 30.0
    heartbeat_timeout: float = 15.0
    republish_after: float = 300.0
    eager_dispatch: bool = True
    chain_steps: int = 25
    chain_seconds: float = 2.0
    wait_poll_interval: float = 5.0

    def __post_init__(self) -> None:
        check_schema_name(self.schema)
        for name in ("max_input_bytes", "max_result_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.chain_steps < 0 or self.chain_seconds < 0:
            raise ValueError("chain_steps and chain_seconds must be >= 0")
        for name in ("lease_grace", "heartbeat_timeout", "republish_after", "wait_poll_interval"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0")

    @classmethod
    def from_env(cls, **overrides: object) -> Settings:
        """Settings from ``SAGA_SCHEMA``, ``SAGA_MAX_INPUT_BYTES``, ``SAGA_LEASE_GRACE``,
        ``SAGA_HEARTBEAT_TIMEOUT``, ``SAGA_REPUBLISH_AFTER``, ``SAGA_EAGER_DISPATCH``,
        ``SAGA_CHAIN_STEPS``, ``SAGA_CHAIN_SECONDS`` and ``SAGA_WAIT_POLL_INTERVAL``, with
        ``overrides`` on top."""
        env: dict[str, object] = {}
        for key, name, conv in (
            ("SAGA_SCHEMA", "schema", str),
            ("SAGA_MAX_INPUT_BYTES", "max_input_bytes", int),
            ("SAGA_LEASE_GRACE", "lease_grace", float),
            ("SAGA_HEARTBEAT_TIMEOUT", "heartbeat_timeout", float),
            ("SAGA_REPUBLISH_AFTER", "republish_after", float),
            ("SAGA_EAGER_DISPATCH", "eager_dispatch", _flag),
            ("SAGA_CHAIN_STEPS", "chain_steps", int),
            ("SAGA_CHAIN_SECONDS", "chain_seconds", float),
            ("SAGA_WAIT_POLL_INTERVAL", "wait_poll_interval", float),
        ):
            if key in os.environ:
                env[name] = conv(os.environ[key])
        env.update(overrides)
        return cls(**env)  # type: ignore[arg-type]
