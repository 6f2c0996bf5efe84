"""What the table modules share: schema-qualified names and JSON parameters."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Connection, TextClause, text

from saga.db.migrate import check_schema_name


@dataclass(frozen=True)
class Tables:
    """Quoted, schema-qualified names of saga's tables for one schema."""

    schema: str

    def __post_init__(self) -> None:
        check_schema_name(self.schema)

    @property
    def runs(self) -> str:
        """``"schema".runs``."""
        return f'"{self.schema}".runs'

    @property
    def steps(self) -> str:
        """``"schema".step_runs``."""
        return f'"{self.schema}".step_runs'

    @property
    def outbox(self) -> str:
        """``"schema".outbox``."""
        return f'"{self.schema}".outbox'

    @property
    def history(self) -> str:
        """``"schema".history``."""
        return f'"{self.schema}".history'

    @property
    def processes(self) -> str:
        """``"schema".processes``."""
        return f'"{self.schema}".processes'

    @property
    def signals(self) -> str:
        """``"schema".signals``."""
        return f'"{self.schema}".signals'

    @property
    def run_counts(self) -> str:
        """``"schema".run_counts``."""
        return f'"{self.schema}".run_counts'

    @property
    def run_count_deltas(self) -> str:
        """``"schema".run_count_deltas``."""
        return f'"{self.schema}".run_count_deltas'

    @property
    def schedules(self) -> str:
        """``"schema".schedules``."""
        return f'"{self.schema}".schedules'

    @property
    def channel(self) -> str:
        """The LISTEN/NOTIFY channel the outbox trigger notifies."""
        return f"{self.schema}_outbox"

    @property
    def runs_channel(self) -> str:
        """The LISTEN/NOTIFY channel the runs table notifies (with the run's id) when a run
        ends."""
        return f"{self.schema}_runs"

    def sql(self, template: str) -> TextClause:
        """``template`` with ``{runs}``, ``{steps}``, ``{outbox}``, ``{history}``,
        ``{processes}``, ``{signals}``, ``{run_counts}``, ``{run_count_deltas}`` and
        ``{schedules}`` filled in, its comments and runs of white space removed: psycopg caches
        the parsing of a statement only up to 4 KB of text, and the hot path's statements must
        stay cached."""
        filled = template.format(
            runs=self.runs, steps=self.steps, outbox=self.outbox, history=self.history,
            processes=self.processes, signals=self.signals, run_counts=self.run_counts,
            run_count_deltas=self.run_count_deltas, schedules=self.schedules,
        )
        return text(squeeze(filled))


Row = dict[str, Any]

_COMMENT = re.compile(r"--[^\n]*")
_SPACE = re.compile(r"\s+")


def squeeze(sql: str) -> str:
    """``sql`` without ``--`` comments and with each run of white space made one space (no
    string literal in saga's statements holds ``--`` or significant white space)."""
    return _SPACE.sub(" ", _COMMENT.sub("", sql)).strip()


@dataclass(frozen=True)
class Statement:
    """A statement of the hot path, run straight on the driver (psycopg) of an SQLAlchemy
    connection: SQLAlchemy's execution machinery (result objects, metadata, events) cost
    about a fifth of a step's client CPU, for statements that need none of it. The driver's
    errors are its own (``psycopg.Error``), not SQLAlchemy's."""

    clause: TextClause
    sql: str
    """The statement in psycopg's form (``%(name)s`` placeholders)."""

    @classmethod
    def of(cls, clause: TextClause) -> Statement:
        """The statement of an SQLAlchemy text clause."""
        from sqlalchemy.dialects.postgresql import psycopg as dialect

        return cls(clause, str(clause.compile(dialect=dialect.dialect())))  # type: ignore[no-untyped-call]

    def first(self, conn: Connection, params: dict[str, Any]) -> dict[str, Any] | None:
        """Run on ``conn``'s driver connection (in its transaction, if any); the first row."""
        import psycopg
        from psycopg.rows import dict_row

        raw = getattr(getattr(conn, "connection", None), "driver_connection", None)
        if not isinstance(raw, psycopg.Connection):
            # Not a synchronous psycopg connection (Django's, or the asyncio driver under
            # ``run_sync``): the caller's own execution path, in its transaction.
            row = conn.execute(self.clause, params).mappings().first()
            return None if row is None else dict(row)
        with raw.cursor(row_factory=dict_row) as cursor:
            cursor.execute(self.sql, params)
            found: dict[str, Any] | None = cursor.fetchone()
            return found
