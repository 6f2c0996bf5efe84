"""The operator's view: the registry of live processes, and run counts kept by triggers.

- ``processes``: each worker and relay registers itself (host, pid, version, queues, the
  workflow definitions it has) and beats ``last_seen_at``.
- ``run_counts`` + ``run_count_deltas``: how many runs each workflow has in each *finished*
  state, so that the runs-by-state gauge and ``saga status`` read a few small rows instead of
  counting every run. Triggers append a delta row when a run enters or leaves a finished state
  (once per run on the hot path: an insert, which never waits for a lock) and when finished
  runs are deleted; the relay folds the deltas into ``run_counts``. Active runs are counted
  directly, on an index (they are few).

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql as pg

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

TZ = sa.DateTime(timezone=True)
FINISHED = "('completed', 'compensated', 'failed', 'cancelled', 'resolved')"


def upgrade() -> None:
    schema = op.get_context().version_table_schema
    op.create_table(
        "processes",
        sa.Column("id", pg.UUID(as_uuid=True), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("host", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("version", sa.String(40), nullable=False),
        sa.Column("queues", pg.JSONB(), server_default="[]", nullable=False),
        sa.Column("definitions", pg.JSONB(), server_default="[]", nullable=False),
        sa.Column("started_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("last_seen_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_processes"),
        sa.CheckConstraint("kind IN ('worker', 'relay')", name="ck_processes_kind"),
        schema=schema,
    )
    op.create_index("ix_processes_last_seen_at", "processes", ["last_seen_at"], schema=schema)

    op.create_table(
        "run_counts",
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("n", sa.BigInteger(), server_default="0", nullable=False),
        sa.PrimaryKeyConstraint("workflow", "state", name="pk_run_counts"),
        schema=schema,
    )
    op.create_table(
        "run_count_deltas",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("workflow", sa.String(100), nullable=False),
        sa.Column("state", sa.String(32), nullable=False),
        sa.Column("delta", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_run_count_deltas"),
        schema=schema,
    )
    s = f'"{schema}"'
    op.execute(
        f"""
        CREATE FUNCTION {s}.count_run_states() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP IN ('UPDATE', 'DELETE') AND OLD.state IN {FINISHED} THEN
                INSERT INTO {s}.run_count_deltas (workflow, state, delta)
                VALUES (OLD.workflow, OLD.state, -1);
            END IF;
            IF TG_OP IN ('UPDATE', 'INSERT') AND NEW.state IN {FINISHED} THEN
                INSERT INTO {s}.run_count_deltas (workflow, state, delta)
                VALUES (NEW.workflow, NEW.state, 1);
            END IF;
            RETURN NULL;
        END $$;
        -- The WHEN clauses are checked without calling the function: a step's completion that
        -- does not finish its run costs nothing here.
        CREATE TRIGGER runs_count_insert AFTER INSERT ON {s}.runs
            FOR EACH ROW WHEN (NEW.state IN {FINISHED})
            EXECUTE FUNCTION {s}.count_run_states();
        CREATE TRIGGER runs_count_update AFTER UPDATE OF state ON {s}.runs
            FOR EACH ROW WHEN (OLD.state IS DISTINCT FROM NEW.state
                               AND (OLD.state IN {FINISHED} OR NEW.state IN {FINISHED}))
            EXECUTE FUNCTION {s}.count_run_states();
        -- Deleting finished runs (retention) goes by batches: one delta row per workflow and
        -- state of the batch, not one per run.
        CREATE FUNCTION {s}.count_deleted_runs() RETURNS trigger
        LANGUAGE plpgsql AS $$
        BEGIN
            INSERT INTO {s}.run_count_deltas (workflow, state, delta)
            SELECT workflow, state, -count(*) FROM gone
            WHERE state IN {FINISHED} GROUP BY workflow, state;
            RETURN NULL;
        END $$;
        CREATE TRIGGER runs_count_delete AFTER DELETE ON {s}.runs
            REFERENCING OLD TABLE AS gone FOR EACH STATEMENT
            EXECUTE FUNCTION {s}.count_deleted_runs();
        INSERT INTO {s}.run_counts (workflow, state, n)
            SELECT workflow, state, count(*) FROM {s}.runs WHERE state IN {FINISHED}
            GROUP BY workflow, state;
        """
    )


def downgrade() -> None:
    schema = op.get_context().version_table_schema
    s = f'"{schema}"'
    op.execute(f"DROP TRIGGER IF EXISTS runs_count_insert ON {s}.runs")
    op.execute(f"DROP TRIGGER IF EXISTS runs_count_update ON {s}.runs")
    op.execute(f"DROP TRIGGER IF EXISTS runs_count_delete ON {s}.runs")
    op.execute(f"DROP FUNCTION IF EXISTS {s}.count_run_states()")
    op.execute(f"DROP FUNCTION IF EXISTS {s}.count_deleted_runs()")
    op.drop_table("run_count_deltas", schema=schema)
    op.drop_table("run_counts", schema=schema)
    op.drop_table("processes", schema=schema)
