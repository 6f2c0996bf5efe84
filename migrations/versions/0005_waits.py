"""Durable timers and signals: a step row may be ``suspended`` (a sleep or a signal wait, no
worker held) with the time the relay wakes it, and runs receive named signals, kept once each.

Revision ID: 0005_waits
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0005_waits"
down_revision = "0004"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
# Frozen here (a migration must not follow later edits of saga.core.states).
OLD_STEP_STATES = ("waiting", "ready", "running", "completed", "failed", "skipped")
NEW_STEP_STATES = (*OLD_STEP_STATES, "suspended")
OLD_EVENTS = (
    "run_started", "step_ready", "step_started", "step_completed", "step_retry_scheduled",
    "step_failed", "step_skipped", "lease_expired", "message_republished", "run_completed",
    "run_compensating", "run_cancelling", "compensation_started", "run_compensated", "run_failed",
    "run_cancelled", "run_compensation_failed", "operator_retry", "operator_resolved",
    "deadline_exceeded",
)
NEW_EVENTS = (*OLD_EVENTS, "step_suspended", "step_woken", "signal_received")


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _checks(schema: str | None, states: tuple[str, ...], events: tuple[str, ...]) -> None:
    op.drop_constraint("ck_step_runs_state", "step_runs", type_="check", schema=schema)
    op.create_check_constraint("ck_step_runs_state", "step_runs", _in("state", states),
                               schema=schema)
    op.drop_constraint("ck_history_event", "history", type_="check", schema=schema)
    op.create_check_constraint("ck_history_event", "history", _in("event", events),
                               schema=schema)


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.add_column("step_runs", sa.Column("wake_at", TZ), schema=schema)
    op.add_column("step_runs", sa.Column("signal", sa.String(100)), schema=schema)
    _checks(schema, NEW_STEP_STATES, NEW_EVENTS)
    op.create_index(
        "ix_step_runs_suspended_wake_at", "step_runs", ["wake_at"],
        postgresql_where=sa.text("state = 'suspended'"), schema=schema,
    )
    op.create_table(
        "signals",
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("payload", pg.JSONB(), nullable=True),
        sa.Column("received_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.ForeignKeyConstraint(["run_id"], [f"{schema}.runs.id"], ondelete="CASCADE",
                                name="fk_signals_run_id_runs"),
        sa.PrimaryKeyConstraint("run_id", "name", name="pk_signals"),
        schema=schema,
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("signals", schema=schema)
    op.drop_index("ix_step_runs_suspended_wake_at", table_name="step_runs", schema=schema)
    # A suspended step goes back to ready: the old engine runs it as a step it does not know
    # how to wait in (a worker of this version is needed to finish it).
    op.execute(
        f"UPDATE \"{schema}\".step_runs SET state = 'ready' WHERE state = 'suspended'"
    )
    op.execute(
        f"DELETE FROM \"{schema}\".history WHERE event IN "
        "('step_suspended', 'step_woken', 'signal_received')"
    )
    _checks(schema, OLD_STEP_STATES, OLD_EVENTS)
    op.drop_column("step_runs", "signal", schema=schema)
    op.drop_column("step_runs", "wake_at", schema=schema)
