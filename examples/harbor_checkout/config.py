"""The example's settings, read from the environment (the demo sets them for every process)."""

from __future__ import annotations

import os
from dataclasses import dataclass

DEFAULT_DATABASE_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/harbor_demo"
DEFAULT_BROKER_URL = "redis://127.0.0.1:6379/3"
DEFAULT_PAYMENTS_URL = "http://127.0.0.1:8766"


@dataclass(frozen=True)
class Config:
    """Where things are and how the demo's knobs are set.

    ``stale_after`` is how old a ``pending`` order must be for the reconcile job to report it;
    ``reconcile_every`` is the interval of the reconcile schedule (seconds);
    ``capture_timeout`` how long an order waits for the provider's capture webhook before it
    is compensated; ``cooling_off`` the timer between packing and ``mark_fulfilled`` (seconds;
    hours in a real shop, a few seconds in the demo).
    """

    database_url: str = DEFAULT_DATABASE_URL
    broker_url: str = DEFAULT_BROKER_URL
    payments_url: str = DEFAULT_PAYMENTS_URL
    stale_after: float = 60.0
    reconcile_every: float = 5.0
    capture_timeout: float = 5.0
    cooling_off: float = 2.0

    @classmethod
    def from_env(cls) -> Config:
        """``HARBOR_DATABASE_URL`` (or ``SAGA_DATABASE_URL``), ``HARBOR_BROKER_URL``,
        ``HARBOR_PAYMENTS_URL``, ``HARBOR_STALE_AFTER``, ``HARBOR_RECONCILE_EVERY``,
        ``HARBOR_CAPTURE_TIMEOUT``, ``HARBOR_COOLING_OFF``."""
        env = os.environ
        return cls(
            database_url=env.get("HARBOR_DATABASE_URL")
            or env.get("SAGA_DATABASE_URL")
            or DEFAULT_DATABASE_URL,
            broker_url=env.get("HARBOR_BROKER_URL", DEFAULT_BROKER_URL),
            payments_url=env.get("HARBOR_PAYMENTS_URL", DEFAULT_PAYMENTS_URL),
            stale_after=float(env.get("HARBOR_STALE_AFTER", cls.stale_after)),
            reconcile_every=float(env.get("HARBOR_RECONCILE_EVERY", cls.reconcile_every)),
            capture_timeout=float(env.get("HARBOR_CAPTURE_TIMEOUT", cls.capture_timeout)),
            cooling_off=float(env.get("HARBOR_COOLING_OFF", cls.cooling_off)),
        )
