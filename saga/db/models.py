"""SQLAlchemy models of saga's tables. They live in their own schema (``saga`` here; another name
is mapped at run time with ``schema_translate_map``)."""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB, UUID
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from saga.db.states import (
    HISTORY_EVENTS,
    PROCESS_KINDS,
    RUN_ACTIVE,
    RUN_STATES,
    RUN_UNFINISHED,
    STEP_KINDS,
    STEP_STATES,
    check_in,
)

SCHEMA = "saga"
"""The schema name the models are declared in."""

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    """Declarative base of saga's own tables."""

    metadata = MetaData(schema=SCHEMA, naming_convention=NAMING)
    type_annotation_map = {dict[str, Any]: JSONB, datetime: DateTime(timezone=True)}


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class Run(Base):
    """One run of a workflow, pinned to the definition (name, version, hash) it started with."""

    __tablename__ = "runs"
    __table_args__ = (
        CheckConstraint(check_in("state", RUN_STATES), name="state"),
        CheckConstraint("steps_remaining >= 0 AND compensations_remaining >= 0", name="counters"),
        # One unfinished run per key; finished ones stay, so a key may name several runs
        # (the newest is the key's run).
        Index(
            "uq_runs_workflow_business_key_unfinished",
            "workflow",
            "business_key",
            unique=True,
            postgresql_where=text(
                f"business_key IS NOT NULL AND {check_in('state', RUN_UNFINISHED)}"
            ),
        ),
        Index(
            "ix_runs_workflow_business_key_created_at",
            "workflow",
            "business_key",
            "created_at",
            postgresql_where=text("business_key IS NOT NULL"),
        ),
        Index(
            "ix_runs_business_key",
            "business_key",
            postgresql_where=text("business_key IS NOT NULL"),
        ),
        Index("ix_runs_created_at", "created_at"),
        Index("ix_runs_state_created_at", "state", "created_at"),
        Index("ix_runs_workflow_state", "workflow", "state"),
        Index(
            "ix_runs_active_deadline",
            "deadline_at",
            postgresql_where=text(
                f"deadline_at IS NOT NULL AND {check_in('state', RUN_ACTIVE[:1])}"
            ),
        ),
        # The relay's query for finished children of waiting steps, and a run's children.
        Index(
            "ix_runs_parent",
            "parent_run_id",
            "parent_step",
            "parent_attempt",
            postgresql_where=text("parent_run_id IS NOT NULL"),
        ),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(100))
    version: Mapped[int] = mapped_column(Integer)
    definition_hash: Mapped[str] = mapped_column(String(64))
    state: Mapped[str] = mapped_column(String(32), server_default="running")
    business_key: Mapped[str | None] = mapped_column(Text)
    input: Mapped[Any] = mapped_column(JSONB)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[Any | None] = mapped_column(JSONB)
    trace_context: Mapped[Any | None] = mapped_column(JSONB)
    steps_remaining: Mapped[int] = mapped_column(Integer)
    compensations_remaining: Mapped[int] = mapped_column(Integer, server_default="0")
    deadline_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    parent_run_id: Mapped[uuid.UUID | None] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.id", ondelete="SET NULL")
    )
    """A child run's parent (:mod:`saga.children`); ``parent_step`` and ``parent_attempt``
    name the step attempt that started it."""
    parent_step: Mapped[str | None] = mapped_column(String(100))
    parent_attempt: Mapped[int | None] = mapped_column(Integer)


class StepRun(Base):
    """Progress of a step (``kind='step'``) or a compensation (``kind='compensation'``)."""

    __tablename__ = "step_runs"
    __table_args__ = (
        CheckConstraint(check_in("state", STEP_STATES), name="state"),
        CheckConstraint(check_in("kind", STEP_KINDS), name="kind"),
        CheckConstraint("attempt >= 0 AND pending_deps >= 0", name="counters"),
        Index(
            "ix_step_runs_running_lease",
            "lease_expires_at",
            postgresql_where=text("state = 'running'"),
        ),
        # The relay's timer query: suspended rows by due time (a sleep's end, a wait's timeout).
        Index(
            "ix_step_runs_suspended_wake_at",
            "wake_at",
            postgresql_where=text("state = 'suspended'"),
        ),
    )

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)
    step: Mapped[str] = mapped_column(String(100), primary_key=True)
    state: Mapped[str] = mapped_column(String(16))
    attempt: Mapped[int] = mapped_column(Integer, server_default="0")
    first_attempt: Mapped[int] = mapped_column(Integer, server_default="1")
    pending_deps: Mapped[int] = mapped_column(Integer)
    result: Mapped[Any | None] = mapped_column(JSONB)
    error: Mapped[Any | None] = mapped_column(JSONB)
    due_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    worker: Mapped[str | None] = mapped_column(Text)
    wake_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """While ``suspended``: when the relay wakes it (a sleep's end, a signal wait's timeout)."""
    signal: Mapped[str | None] = mapped_column(String(100))
    """While ``suspended`` waiting for a signal: the signal's name."""
    item: Mapped[Any | None] = mapped_column(JSONB)
    """For an instance of a map (``label[00042]``): its item of the list the map expanded."""
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class Signal(Base):
    """A named event sent to a run (``Saga.signal``), kept until the run is pruned: a wait that
    starts later finds it, and a second signal of the same name is ignored (the key)."""

    __tablename__ = "signals"

    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE"), primary_key=True
    )
    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    payload: Mapped[Any | None] = mapped_column(JSONB)
    received_at: Mapped[datetime] = _now()


class OutboxMessage(Base):
    """A "step attempt is ready" message, written with the state change that made it ready and
    deleted when a worker claims the attempt. A relay takes a batch by pushing its
    ``available_at`` a little ahead (so a relay killed mid-batch leaves it due again), publishes
    it outside any transaction, then sets ``published_at``."""

    __tablename__ = "outbox"
    __table_args__ = (
        CheckConstraint(check_in("kind", STEP_KINDS), name="kind"),
        UniqueConstraint("run_id", "kind", "step", "attempt"),
        Index(
            "ix_outbox_unpublished",
            "available_at",
            "id",
            postgresql_where=text("published_at IS NULL"),
        ),
        Index(
            "ix_outbox_republish",
            "republish_at",
            postgresql_where=text("published_at IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE")
    )
    kind: Mapped[str] = mapped_column(String(16))
    step: Mapped[str] = mapped_column(String(100))
    attempt: Mapped[int] = mapped_column(Integer)
    queue: Mapped[str] = mapped_column(String(100))
    priority: Mapped[int | None] = mapped_column(Integer)
    time_limit: Mapped[float | None] = mapped_column()
    available_at: Mapped[datetime] = _now()
    published_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    publish_count: Mapped[int] = mapped_column(Integer, server_default="0")
    republish_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    """When a published message no worker has claimed is published again (backing off)."""
    deferrals: Mapped[int] = mapped_column(Integer, server_default="0")
    """How often workers without the run's workflow definition sent the message back."""
    trace_context: Mapped[Any | None] = mapped_column(JSONB)
    created_at: Mapped[datetime] = _now()


class HistoryEntry(Base):
    """An append-only record of one transition (a trigger refuses updates)."""

    __tablename__ = "history"
    __table_args__ = (
        CheckConstraint(check_in("event", HISTORY_EVENTS), name="event"),
        Index("ix_history_run_id_id", "run_id", "id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(
        UUID(as_uuid=True), ForeignKey("runs.id", ondelete="CASCADE")
    )
    event: Mapped[str] = mapped_column(String(40))
    kind: Mapped[str | None] = mapped_column(String(16))
    step: Mapped[str | None] = mapped_column(String(100))
    attempt: Mapped[int | None] = mapped_column(Integer)
    detail: Mapped[Any | None] = mapped_column(JSONB)
    at: Mapped[datetime] = _now()


class Process(Base):
    """A live worker or relay: registered at start, beaten while it runs, removed on a clean
    exit (rows of processes that died go stale and are pruned)."""

    __tablename__ = "processes"
    __table_args__ = (
        CheckConstraint(check_in("kind", PROCESS_KINDS), name="kind"),
        Index("ix_processes_last_seen_at", "last_seen_at"),
    )

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    name: Mapped[str] = mapped_column(Text)
    host: Mapped[str] = mapped_column(Text)
    pid: Mapped[int] = mapped_column(Integer)
    version: Mapped[str] = mapped_column(String(40))
    queues: Mapped[Any] = mapped_column(JSONB, server_default="[]")
    definitions: Mapped[Any] = mapped_column(JSONB, server_default="[]")
    started_at: Mapped[datetime] = _now()
    last_seen_at: Mapped[datetime] = _now()


class RunCount(Base):
    """How many runs a workflow has in a finished state (folded from the deltas)."""

    __tablename__ = "run_counts"

    workflow: Mapped[str] = mapped_column(String(100), primary_key=True)
    state: Mapped[str] = mapped_column(String(32), primary_key=True)
    n: Mapped[int] = mapped_column(BigInteger, server_default="0")


class RunCountDelta(Base):
    """A change to :class:`RunCount` written by a trigger, not yet folded in."""

    __tablename__ = "run_count_deltas"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(100))
    state: Mapped[str] = mapped_column(String(32))
    delta: Mapped[int] = mapped_column(BigInteger)


class RunWaiter(Base):
    """A caller waiting on a run's outcome (:class:`saga.handles.RunWatcher`): the run notifies
    when it ends only while someone waits on it."""

    __tablename__ = "run_waiters"
    __table_args__ = (Index("ix_run_waiters_run_id", "run_id"),)

    id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True), primary_key=True)
    run_id: Mapped[uuid.UUID] = mapped_column(UUID(as_uuid=True))
    since: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), nullable=False, server_default=func.now()
    )


class ScheduleRow(Base):
    """A declared :class:`~saga.schedules.Schedule` and its next unfired slot; a relay fires a
    slot by starting its run and advancing ``next_slot`` in one transaction."""

    __tablename__ = "schedules"
    __table_args__ = (
        CheckConstraint("catch_up IN ('skip', 'all')", name="catch_up"),
        CheckConstraint(
            "fired >= 0 AND skipped >= 0 AND (last_slot IS NULL OR last_slot < next_slot)",
            name="slots",
        ),
        Index("ix_schedules_next_slot", "next_slot"),
    )

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    workflow: Mapped[str] = mapped_column(String(100))
    spec: Mapped[str] = mapped_column(Text)
    catch_up: Mapped[str] = mapped_column(String(8))
    next_slot: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_slot: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_run_id: Mapped[uuid.UUID | None] = mapped_column(UUID(as_uuid=True))
    fired: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """Slots fired (runs started)."""
    skipped: Mapped[int] = mapped_column(BigInteger, server_default="0")
    """Due slots skipped under the catch-up policy."""
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()
