"""What a step's code receives."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from sqlalchemy import Connection

JSON = Any
"""A value that survives ``json.dumps``/``json.loads`` (dict, list, str, int, float, bool, None)."""


@dataclass(frozen=True)
class StepContext:
    """The run's input and the results of a step's dependencies, for one attempt.

    ``idempotency_key`` is the same for every attempt of one step (or compensation) of one run,
    so calls to outside systems can be deduplicated across retries and re-deliveries.

    For a compensation, ``step_result`` is the result of the step being undone (``None`` unless
    it completed), ``outcome`` what is known of it (``completed``; ``failed``: its code raised,
    possibly after part of its effect; ``unknown``: its worker died, it ran past its time limit
    or its result could not be stored), and ``step_idempotency_key`` the key the step's own
    calls used, so the compensation can look the effect up and undo exactly that.
    """

    run_id: str
    workflow: str
    step: str
    kind: str
    attempt: int
    input: JSON
    results: Mapping[str, JSON]
    idempotency_key: str
    business_key: str | None = None
    step_result: JSON = None
    outcome: str | None = None
    step_idempotency_key: str | None = None
    connection: Connection | None = None
    """For a transactional step (:func:`saga.transactional`): the connection of the transaction
    that records its completion; ``None`` for any other step."""
    item: JSON = None
    """For an instance of a map (:meth:`saga.Workflow.map`) and its compensation: its item."""
    index: int | None = None
    """For an instance of a map and its compensation: its item's index in the list."""

    @property
    def is_compensation(self) -> bool:
        """Whether this attempt undoes ``step`` rather than runs it."""
        return self.kind == "compensation"
