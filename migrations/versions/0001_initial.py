"""saga's initial schema: runs, step_runs, outbox, history.

Revision ID: 0001
Revises:
Create Date: 2026-11-24
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

RUN_STATES = (
    "running", "compensating", "cancelling", "completed", "compensated", "failed", "cancelled",
    "compensation_failed", "resolved",
)
STEP_STATES = ("waiting", "ready", "running", "completed", "failed", "skipped")
STEP_KINDS = ("step", "compensation")
HISTORY_EVENTS = (
    "run_started", "step_ready", "step_started", "step_completed", "step_retry_scheduled",
    "step_failed", "step_skipped", "lease_expired", "message_republished", "run_completed",
    "run_compensating", "run_cancelling", "compensation_started", "run_compensated", "run_failed",
    "run_cancelled", "run_compensation_failed", "operator_retry", "operator_resolved",
    "deadline_exceeded",
)
TZ = sa.DateTime(timezone=True)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


def _now() -> sa.Column:  # type: ignore[type-arg]
    return sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False)


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "runs",
        sa.Column("id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("definition_hash", sa.String(64), nullable=False),
        sa.Column("state", sa.String(32), server_default="running", nullable=False),
        sa.Column("business_key", sa.Text()),
        sa.Column("input", pg.JSONB(), nullable=False),
        sa.Column("result", pg.JSONB()),
        sa.Column("error", pg.JSONB()),
        sa.Column("trace_context", pg.JSONB()),
        sa.Column("steps_remaining", sa.Integer(), nullable=False),
        sa.Column("compensations_remaining", sa.Integer(), server_default="0", nullable=False),
        sa.Column("deadline_at", TZ),
        _now(),
        sa.Column("updated_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("finished_at", TZ),
        sa.PrimaryKeyConstraint("id", name="pk_runs"),
        sa.CheckConstraint(_in("state", RUN_STATES), name="ck_runs_state"),
        sa.CheckConstraint(
            "steps_remaining >= 0 AND compensations_remaining >= 0", name="ck_runs_counters"
        ),
        schema=schema,
    )
    op.create_index(
        "uq_runs_workflow_business_key", "runs", ["workflow", "business_key"], unique=True,
        postgresql_where=sa.text("business_key IS NOT NULL"), schema=schema,
    )
    op.create_index(
        "ix_runs_business_key", "runs", ["business_key"],
        postgresql_where=sa.text("business_key IS NOT NULL"), schema=schema,
    )
    op.create_index("ix_runs_created_at", "runs", ["created_at"], schema=schema)
    op.create_index("ix_runs_state_created_at", "runs", ["state", "created_at"], schema=schema)
    op.create_index("ix_runs_workflow_state", "runs", ["workflow", "state"], schema=schema)
    op.create_index(
        "ix_runs_active_deadline", "runs", ["deadline_at"],
        postgresql_where=sa.text("deadline_at IS NOT NULL AND state IN ('running')"),
        schema=schema,
    )

    op.create_table(
        "step_runs",
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_attempt", sa.Integer(), server_default="1", nullable=False),
        sa.Column("pending_deps", sa.Integer(), nullable=False),
        sa.Column("result", pg.JSONB()),
        sa.Column("error", pg.JSONB()),
        sa.Column("due_at", TZ),
        sa.Column("lease_expires_at", TZ),
        sa.Column("worker", sa.Text()),
        _now(),
        sa.Column("started_at", TZ),
        sa.Column("finished_at", TZ),
        sa.PrimaryKeyConstraint("run_id", "kind", "step", name="pk_step_runs"),
        sa.ForeignKeyConstraint(
            ["run_id"], [f"{schema}.runs.id"], name="fk_step_runs_run_id_runs", ondelete="CASCADE"
        ),
        sa.CheckConstraint(_in("state", STEP_STATES), name="ck_step_runs_state"),
        sa.CheckConstraint(_in("kind", STEP_KINDS), name="ck_step_runs_kind"),
        sa.CheckConstraint("attempt >= 0 AND pending_deps >= 0", name="ck_step_runs_counters"),
        schema=schema,
    )
    op.create_index(
        "ix_step_runs_running_lease", "step_runs", ["lease_expires_at"],
        postgresql_where=sa.text("state = 'running'"), schema=schema,
    )

    op.create_table(
        "outbox",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("step", sa.String(100), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("queue", sa.String(100), nullable=False),
        sa.Column("priority", sa.Integer()),
        sa.Column("time_limit", sa.Float()),
        sa.Column("available_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("published_at", TZ),
        sa.Column("publish_count", sa.Integer(), server_default="0", nullable=False),
        sa.Column("trace_context", pg.JSONB()),
        _now(),
        sa.PrimaryKeyConstraint("id", name="pk_outbox"),
        sa.ForeignKeyConstraint(
            ["run_id"], [f"{schema}.runs.id"], name="fk_outbox_run_id_runs", ondelete="CASCADE"
        ),
        sa.CheckConstraint(_in("kind", STEP_KINDS), name="ck_outbox_kind"),
        sa.UniqueConstraint(
            "run_id", "kind", "step", "attempt", name="uq_outbox_run_id_kind_step_attempt"
        ),
        schema=schema,
    )
    op.create_index(
        "ix_outbox_unpublished", "outbox", ["available_at", "id"],
        postgresql_where=sa.text("published_at IS NULL"), schema=schema,
    )
    op.create_index(
        "ix_outbox_published", "outbox", ["published_at"],
        postgresql_where=sa.text("published_at IS NOT NULL"), schema=schema,
    )

    op.create_table(
        "history",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("run_id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("event", sa.String(40), nullable=False),
        sa.Column("kind", sa.String(16)),
        sa.Column("step", sa.String(100)),
        sa.Column("attempt", sa.Integer()),
        sa.Column("detail", pg.JSONB()),
        sa.Column("at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_history"),
        sa.ForeignKeyConstraint(
            ["run_id"], [f"{schema}.runs.id"], name="fk_history_run_id_runs", ondelete="CASCADE"
        ),
        sa.CheckConstraint(_in("event", HISTORY_EVENTS), name="ck_history_event"),
        schema=schema,
    )
    op.create_index("ix_history_run_id_id", "history", ["run_id", "id"], schema=schema)

    # The history is append-only: an UPDATE is a bug, so the database refuses it.
    op.execute(
        f"""
        CREATE FUNCTION "{schema}".history_is_append_only() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'saga history is append-only';
        END $$;
        CREATE TRIGGER history_append_only BEFORE UPDATE ON "{schema}".history
            FOR EACH ROW EXECUTE FUNCTION "{schema}".history_is_append_only();
        """
    )
    # Wake the relay the moment a message is written (identical notifications in one
    # transaction are folded into one by PostgreSQL).
    op.execute(
        f"""
        CREATE FUNCTION "{schema}".notify_outbox() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{schema}_outbox', '');
            RETURN NULL;
        END $$;
        CREATE TRIGGER outbox_notify AFTER INSERT OR UPDATE OF published_at ON "{schema}".outbox
            FOR EACH ROW WHEN (NEW.published_at IS NULL)
            EXECUTE FUNCTION "{schema}".notify_outbox();
        """
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    op.drop_table("history", schema=schema)
    op.drop_table("outbox", schema=schema)
    op.drop_table("step_runs", schema=schema)
    op.drop_table("runs", schema=schema)
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".history_is_append_only()')
    op.execute(f'DROP FUNCTION IF EXISTS "{schema}".notify_outbox()')
