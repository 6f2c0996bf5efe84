"""Relay publishers for in-process tests."""

from __future__ import annotations

from typing import Any


class Collect:
    """A relay publisher that keeps the (run, step) of each message it is given."""

    def __init__(self) -> None:
        self.steps: list[tuple[str, str]] = []

    def publish(self, envelope: Any) -> None:
        """Keep the message's run and step."""
        self.steps.append((envelope.message.run_id, envelope.message.step))
