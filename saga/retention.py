"""Retention: deleting finished runs, with their steps, history and outbox rows.

Runs go in small batches, each its own short transaction (``FOR UPDATE SKIP LOCKED``: a run an
operator is retrying at that moment is skipped, not waited for), oldest first, state by state
on ``ix_runs_state_created_at``. Only finished states qualify (a run ``running``,
``compensating``, ``cancelling`` or ``compensation_failed`` is never touched), and only runs
that finished before the cutoff. Step rows, history and outbox rows go with their run
(``ON DELETE CASCADE``); ``run_counts`` follows through its trigger.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from sqlalchemy import Engine

from saga.db.states import RUN_FINISHED
from saga.store.base import Tables

BATCH_SIZE = 200
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_DURATION = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*")

# created_at <= finished_at, so the index range on created_at holds every candidate; the
# finished_at condition drops the few that started before the cutoff but finished after it.
_BATCH = """
WITH doomed AS (
    SELECT id FROM {runs}
    WHERE state = :state AND created_at < :cutoff AND finished_at < :cutoff
    ORDER BY created_at LIMIT :limit
    FOR UPDATE SKIP LOCKED
)
DELETE FROM {runs} r USING doomed WHERE r.id = doomed.id AND r.state = :state
"""
_COUNT = """
SELECT count(*) FROM {runs}
WHERE state = :state AND created_at < :cutoff AND finished_at < :cutoff
"""


def parse_duration(text: str) -> float:
    """Seconds in ``30d``, ``12h``, ``90m``, ``45s``, ``2w`` or a bare number of seconds."""
    found = _DURATION.fullmatch(text)
    if not found:
        raise ValueError(f"{text!r} is not a duration (like 30d, 12h, 90m, 45s)")
    seconds = float(found[1]) * _UNITS[found[2] or "s"]
    if seconds <= 0:
        raise ValueError(f"{text!r}: a duration must be more than 0")
    return seconds


def check_states(states: Iterable[str]) -> tuple[str, ...]:
    """``states``, refused unless each is a finished state."""
    chosen = tuple(dict.fromkeys(states)) or RUN_FINISHED
    bad = [s for s in chosen if s not in RUN_FINISHED]
    if bad:
        raise ValueError(
            f"only finished runs can be pruned ({', '.join(RUN_FINISHED)}), not {bad[0]!r}"
        )
    return chosen


@dataclass
class Retention:
    """Prunes runs of ``states`` that finished more than ``older_than`` seconds ago."""

    engine: Engine
    tables: Tables
    older_than: float
    states: tuple[str, ...] = RUN_FINISHED
    batch_size: int = BATCH_SIZE
    deleted: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.states = check_states(self.states)
        if self.older_than <= 0 or self.batch_size < 1:
            raise ValueError("older_than must be > 0 and batch_size >= 1")
        self._batch = self.tables.sql(_BATCH)
        self._count = self.tables.sql(_COUNT)

    def cutoff(self) -> datetime:
        """The instant before which finished runs go."""
        return datetime.now(UTC) - timedelta(seconds=self.older_than)

    def preview(self) -> dict[str, int]:
        """How many runs of each state would go now (nothing is deleted)."""
        cutoff = self.cutoff()
        with self.engine.connect() as conn:
            return {
                s: int(conn.execute(self._count, {"state": s, "cutoff": cutoff}).scalar_one())
                for s in self.states
            }

    def batch(self, state: str, cutoff: datetime | None = None) -> int:
        """Delete one batch of ``state`` runs in a transaction of its own; how many went."""
        params = {"state": state, "cutoff": cutoff or self.cutoff(), "limit": self.batch_size}
        with self.engine.begin() as conn:
            n = int(conn.execute(self._batch, params).rowcount)
        self.deleted[state] = self.deleted.get(state, 0) + n
        return n

    def step(self) -> int:
        """One batch of each state; how many runs went (less than a full batch in every
        state: nothing is left to prune)."""
        cutoff = self.cutoff()
        return sum(self.batch(state, cutoff) for state in self.states)

    def run(
        self,
        progress: Callable[[dict[str, int]], None] | None = None,
        pause: float = 0.0,
    ) -> dict[str, int]:
        """Delete every qualifying run, batch after batch, ``pause`` seconds apart (room for
        the hot path on a busy machine); the count by state."""
        cutoff = self.cutoff()
        for state in self.states:
            while self.batch(state, cutoff) == self.batch_size:
                if progress is not None:
                    progress(dict(self.deleted))
                if pause > 0:
                    time.sleep(pause)
        return {s: self.deleted.get(s, 0) for s in self.states}
