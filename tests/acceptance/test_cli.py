"""The ``saga`` command line, against a migrated database holding runs in every state."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery
from click.testing import CliRunner, Result
from sqlalchemy import Engine, text

from saga.app import Saga
from saga.celery_adapter import install
from saga.cli.config import ExitCode
from saga.cli.main import cli
from saga.context import StepContext
from saga.db.states import RUN_STATES
from saga.definition import Workflow
from saga.registry import Registry

ROOT = Path(__file__).resolve().parents[2]
MODULE = "tests.acceptance.test_cli"

order = Workflow("order", version=1)


@order.step()
def reserve(ctx: StepContext) -> Any:
    return {"reserved": True}


@order.step(after=[reserve])
def charge(ctx: StepContext) -> Any:
    return {"charged": True}


@order.step(after=[charge])
def ship(ctx: StepContext) -> Any:
    return {"shipped": True}


@order.compensation(reserve)
def release(ctx: StepContext) -> Any:
    return None


@order.compensation(charge)
def refund(ctx: StepContext) -> Any:
    return None


REGISTRY = Registry(order)
"""What ``--app tests.acceptance.test_cli:REGISTRY`` loads."""

ENGINE = Saga(
    REGISTRY, database_url=os.environ.get("SAGA_DATABASE_URL", "postgresql://127.0.0.1/x")
)
"""What ``--app tests.acceptance.test_cli:ENGINE`` loads: a Saga, not a Celery app."""
celery_app = Celery("saga-cli-test", broker="memory://")
install(celery_app, ENGINE)


def _step_states(state: str) -> dict[tuple[str, str], tuple[str, str | None]]:
    """(kind, step) -> (state, error message) making a run in ``state`` look plausible."""
    done = ("completed", None)
    steps: dict[tuple[str, str], tuple[str, str | None]] = {
        ("step", "reserve"): done,
        ("step", "charge"): done,
        ("step", "ship"): ("waiting", None),
    }
    if state == "running":
        steps[("step", "charge")] = ("running", None)
    elif state == "completed":
        steps[("step", "ship")] = done
    elif state in ("failed", "compensating", "compensated", "compensation_failed", "resolved"):
        steps[("step", "charge")] = ("failed", "card declined")
        steps[("step", "ship")] = ("skipped", None)
    elif state in ("cancelling", "cancelled"):
        steps[("step", "ship")] = ("skipped", None)
    if state in ("compensating", "compensated", "cancelling", "cancelled", "resolved"):
        steps[("compensation", "reserve")] = done
    if state == "compensation_failed":
        steps[("compensation", "reserve")] = ("failed", "warehouse unreachable")
    return steps


def make_run(engine: Engine, saga: Saga, state: str) -> str:
    """Start a run (key ``k-<state>``) and move it to ``state`` in SQL."""
    run_id = saga.start_now("order", {"state": state}, key=f"k-{state}").run_id
    with engine.begin() as conn:
        conn.execute(text("DELETE FROM saga.outbox WHERE run_id = :id"), {"id": run_id})
        for (kind, step), (st, message) in _step_states(state).items():
            error = None if message is None else json.dumps({"type": "X", "message": message})
            conn.execute(
                text(
                    "INSERT INTO saga.step_runs (run_id, kind, step, state, attempt, pending_deps,"
                    " error, started_at, finished_at, lease_expires_at, worker)"
                    " VALUES (:id, :kind, :step, CAST(:st AS text), 1, 0,"
                    " CAST(:error AS jsonb), now() - interval '1 minute',"
                    " CASE WHEN CAST(:st AS text) = 'running' THEN NULL ELSE now() END,"
                    " CASE WHEN CAST(:st AS text) = 'running'"
                    " THEN now() - interval '10 seconds' END, 'w1')"
                    " ON CONFLICT (run_id, kind, step) DO UPDATE SET state = excluded.state,"
                    " attempt = 1, pending_deps = 0, error = excluded.error,"
                    " started_at = excluded.started_at, finished_at = excluded.finished_at,"
                    " lease_expires_at = excluded.lease_expires_at, worker = excluded.worker"
                ),
                {"id": run_id, "kind": kind, "step": step, "st": st, "error": error},
            )
        finished = state not in ("running", "compensating", "cancelling", "compensation_failed")
        conn.execute(
            text(
                "UPDATE saga.runs SET state = CAST(:st AS text), steps_remaining = 0,"
                " error = CASE WHEN CAST(:st AS text)"
                " IN ('failed', 'compensated', 'compensation_failed')"
                " THEN '{\"type\": \"X\", \"message\": \"card declined\"}'::jsonb END,"
                " finished_at = CASE WHEN :fin THEN now() END WHERE id = :id"
            ),
            {"st": state, "fin": finished, "id": run_id},
        )
        conn.execute(
            text(
                "INSERT INTO saga.history (run_id, event, kind, step, attempt, detail)"
                " VALUES (:id, 'step_failed', 'step', 'charge', 1, '{\"message\": \"boom\"}')"
            ),
            {"id": run_id},
        )
    return run_id


@pytest.fixture
def runs(db_url: str, engine: Engine) -> Iterator[dict[str, str]]:
    """One run in each state, by state; a ready outbox row is left for the running one."""
    saga = Saga(REGISTRY, engine=engine)
    ids = {state: make_run(engine, saga, state) for state in RUN_STATES}
    saga.start_now("order", {"pending": True}, key="k-pending")
    yield ids


@pytest.fixture
def invoke(db_url: str, monkeypatch: pytest.MonkeyPatch) -> Any:
    """Run ``saga ARGS`` in process against the test database (plain output)."""
    monkeypatch.setenv("SAGA_DATABASE_URL", db_url)
    monkeypatch.delenv("SAGA_APP", raising=False)
    monkeypatch.delenv("SAGA_SCHEMA", raising=False)

    def run(*args: str, input: str | None = None) -> Result:
        return CliRunner().invoke(cli, ["--plain", *args], input=input, catch_exceptions=False)

    return run


def error_line(result: Result) -> str:
    """The single line on stderr, checked to be one ``saga: error:`` line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("saga: error: ")
    assert "Traceback" not in result.output
    return lines[0]


# -- status --------------------------------------------------------------------------------


def test_status_counts_runs_by_workflow_and_state(invoke: Any, runs: dict[str, str]) -> None:
    result = invoke("status")
    assert result.exit_code == ExitCode.OK, result.output
    assert "Runs by workflow and state" in result.stdout
    assert "order" in result.stdout and "compensation_failed" in result.stdout
    assert "Steps past their lease: 1" in result.stdout
    assert "Runs waiting for an operator: 1" in result.stdout


def test_status_json_reports_counts_backlog_leases_and_waiting_runs(
    invoke: Any, runs: dict[str, str]
) -> None:
    doc = json.loads(invoke("status", "--json").stdout)
    by_state = doc["runs"]["by_workflow"]["order"]
    assert by_state["running"] == 2  # the pending run too
    assert all(by_state[s] == 1 for s in RUN_STATES if s != "running")
    assert doc["runs"]["total"] == len(RUN_STATES) + 1
    assert doc["outbox"]["unpublished"] == 1
    assert doc["expired_leases"]["count"] == 1
    assert doc["expired_leases"]["steps"][0]["run_id"] == runs["running"]
    assert doc["waiting_for_operator"]["count"] == 1
    assert doc["waiting_for_operator"]["runs"][0]["id"] == runs["compensation_failed"]


def test_status_of_a_run_by_key_shows_header_steps_compensations_and_history(
    invoke: Any, runs: dict[str, str]
) -> None:
    result = invoke("status", "k-compensation_failed")
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert runs["compensation_failed"] in out
    assert "order v1" in out and "compensation_failed" in out
    assert "card declined" in out and "warehouse unreachable" in out
    assert "Compensations" in out and "History" in out and "step_failed" in out


def test_status_of_a_run_json_separates_steps_from_compensations(
    invoke: Any, runs: dict[str, str]
) -> None:
    doc = json.loads(invoke("status", runs["compensated"], "--json").stdout)
    assert doc["run"]["id"] == runs["compensated"]
    assert doc["run"]["state"] == "compensated"
    assert {s["step"]: s["state"] for s in doc["steps"]} == {
        "reserve": "completed", "charge": "failed", "ship": "skipped"
    }
    assert [c["step"] for c in doc["compensations"]] == ["reserve"]
    assert doc["steps"][0].keys() >= {
        "attempt", "started_at", "duration_seconds", "error_message", "error"
    }
    assert [h["event"] for h in doc["history"]][-1] == "step_failed"


def test_an_unknown_run_exits_3_with_one_line(invoke: Any, runs: dict[str, str]) -> None:
    for ref in ("no-such-key", "00000000-0000-0000-0000-000000000000"):
        result = invoke("status", ref)
        assert result.exit_code == ExitCode.NOT_FOUND
        assert ref in error_line(result)


# -- list ----------------------------------------------------------------------------------


def test_list_shows_newest_first_and_filters_by_state(invoke: Any, runs: dict[str, str]) -> None:
    doc = json.loads(invoke("list", "--json").stdout)
    created = [r["created_at"] for r in doc["runs"]]
    assert created == sorted(created, reverse=True)
    assert len(doc["runs"]) == len(RUN_STATES) + 1 and doc["next_before"] is None
    failed = json.loads(invoke("list", "--state", "failed", "--json").stdout)["runs"]
    assert [r["id"] for r in failed] == [runs["failed"]]
    assert failed[0]["error_message"] == "card declined"
    two = invoke("list", "--state", "failed", "--state", "resolved", "--json").stdout
    assert {r["state"] for r in json.loads(two)["runs"]} == {"failed", "resolved"}
    text_out = invoke("list", "--state", "failed").stdout
    assert text_out.splitlines()[0].split()[:3] == ["ID", "WORKFLOW", "STATE"]
    assert runs["failed"] in text_out


def test_list_filters_by_workflow_key_and_time(invoke: Any, runs: dict[str, str]) -> None:
    by_key = json.loads(invoke("list", "--key", "k-resolved", "--json").stdout)["runs"]
    assert [r["id"] for r in by_key] == [runs["resolved"]]
    assert json.loads(invoke("list", "--workflow", "nope", "--json").stdout)["runs"] == []
    future = json.loads(invoke("list", "--since", "2999-01-01", "--json").stdout)["runs"]
    assert future == []
    past = json.loads(invoke("list", "--until", "2999-01-01T00:00:00Z", "--json").stdout)
    assert len(past["runs"]) == len(RUN_STATES) + 1


def test_list_pages_with_the_before_cursor_and_page_numbers(
    invoke: Any, runs: dict[str, str]
) -> None:
    seen: list[str] = []
    cursor: str | None = None
    while True:
        args = ["list", "--limit", "4", "--json"] + (["--before", cursor] if cursor else [])
        doc = json.loads(invoke(*args).stdout)
        seen += [r["id"] for r in doc["runs"]]
        cursor = doc["next_before"]
        if cursor is None:
            break
    assert len(seen) == len(set(seen)) == len(RUN_STATES) + 1
    page2 = json.loads(invoke("list", "--limit", "4", "--page", "2", "--json").stdout)["runs"]
    assert [r["id"] for r in page2] == seen[4:8]
    plain = invoke("list", "--limit", "4")
    assert "more: --before" in plain.stderr


def test_status_and_list_name_the_error_message_alike(invoke: Any, runs: dict[str, str]) -> None:
    listed = json.loads(invoke("list", "--state", "failed", "--json").stdout)["runs"]
    shown = json.loads(invoke("status", runs["failed"], "--json").stdout)
    overview = json.loads(invoke("status", "--json").stdout)
    charge = next(s for s in shown["steps"] if s["step"] == "charge")

    assert listed[0]["error_message"] == "card declined"
    assert shown["run"]["error_message"] == "card declined"
    assert charge["error_message"] == "card declined"
    assert charge["error"] == {"type": "X", "message": "card declined"}
    assert overview["waiting_for_operator"]["runs"][0]["error_message"] == "card declined"


def test_a_page_number_out_of_range_exits_2(invoke: Any, runs: dict[str, str]) -> None:
    for page in ("99999999999999999999", "0"):
        result = invoke("list", "--page", page)
        assert result.exit_code == ExitCode.USAGE, result.output
        assert "--page" in error_line(result)


def test_a_bad_state_exits_2_and_lists_the_valid_states(invoke: Any, runs: dict[str, str]) -> None:
    result = invoke("list", "--state", "bogus")
    assert result.exit_code == ExitCode.USAGE
    line = error_line(result)
    assert "bogus" in line and all(s in line for s in RUN_STATES)


def test_a_bad_timestamp_exits_2(invoke: Any, runs: dict[str, str]) -> None:
    result = invoke("list", "--since", "yesterday")
    assert result.exit_code == ExitCode.USAGE
    assert "ISO 8601" in error_line(result)


# -- graph ---------------------------------------------------------------------------------


def test_graph_of_a_workflow_draws_layers_mermaid_and_dot(
    invoke: Any, runs: dict[str, str]
) -> None:
    app = ["--app", f"{MODULE}:REGISTRY"]
    textual = invoke("graph", "order", *app)
    assert textual.exit_code == 0, textual.output
    lines = textual.stdout.splitlines()
    assert lines[0].startswith("order v1")
    assert next(ln for ln in lines if "charge" in ln).strip().startswith("[1] charge")
    assert "← reserve" in textual.stdout
    mermaid = invoke("graph", "order", "--format", "mermaid", *app).stdout
    assert mermaid.startswith("flowchart TD") and "s0 --> s1" in mermaid
    dot = invoke("graph", "order", "--format", "dot", *app).stdout
    assert dot.startswith('digraph "order v1"') and '"charge" -> "ship";' in dot


def test_graph_of_a_run_shows_each_steps_state(invoke: Any, runs: dict[str, str]) -> None:
    doc = json.loads(invoke("graph", "k-failed", "--json", "--app", f"{MODULE}:REGISTRY").stdout)
    assert doc["run"] == {"id": runs["failed"], "state": "failed"}
    assert [(s["name"], s["depth"], s["state"]) for s in doc["steps"]] == [
        ("reserve", 0, "completed"), ("charge", 1, "failed"), ("ship", 2, "skipped")
    ]
    mermaid = invoke("graph", "k-failed", "--format", "mermaid", "--app", f"{MODULE}:REGISTRY")
    assert "classDef failed" in mermaid.stdout


def test_graph_without_an_app_is_a_configuration_error(invoke: Any) -> None:
    result = invoke("graph", "order")
    assert result.exit_code == ExitCode.CONFIG
    assert "--app" in error_line(result)


# -- operator actions ----------------------------------------------------------------------


def test_retry_cancel_and_resolve_change_the_run(invoke: Any, runs: dict[str, str]) -> None:
    app = ["--app", f"{MODULE}:REGISTRY", "--yes", "--json"]
    retried = invoke("retry", "k-failed", *app)
    assert retried.exit_code == 0, retried.output
    assert json.loads(retried.stdout)["state"] == "running"
    resolved = invoke("resolve", "k-compensation_failed", "--reason", "refunded by hand", *app)
    assert json.loads(resolved.stdout) == {
        "run_id": runs["compensation_failed"], "action": "resolve",
        "previous_state": "compensation_failed", "state": "resolved",
    }
    cancelled = invoke("cancel", "k-pending", "--reason", "customer asked", *app[:-1])
    assert cancelled.exit_code == 0, cancelled.output
    assert "running ->" in cancelled.stdout
    doc = json.loads(invoke("status", "k-compensation_failed", "--json").stdout)
    assert doc["history"][-1]["event"] == "operator_resolved"


def test_an_action_the_state_forbids_exits_4(invoke: Any, runs: dict[str, str]) -> None:
    result = invoke("cancel", "k-completed", "--yes", "--app", f"{MODULE}:REGISTRY")
    assert result.exit_code == ExitCode.INVALID_STATE
    assert "completed" in error_line(result)


def test_rerun_starts_a_finished_run_again_under_its_key_and_list_shows_both(
    invoke: Any, runs: dict[str, str]
) -> None:
    app = ["--app", f"{MODULE}:REGISTRY", "--yes"]
    rerun = invoke("rerun", "k-compensated", *app, "--json")
    assert rerun.exit_code == 0, rerun.output
    doc = json.loads(rerun.stdout)
    assert doc["rerun_of"] == runs["compensated"] and doc["key"] == "k-compensated"
    new = doc["run_id"]

    status = json.loads(invoke("status", "k-compensated", "--json").stdout)
    assert (status["run"]["id"], status["run"]["state"]) == (new, "running")
    listed = json.loads(invoke("list", "--key", "k-compensated", "--json").stdout)["runs"]
    assert [(r["id"], r["state"]) for r in listed] == [
        (new, "running"), (runs["compensated"], "compensated"),
    ]
    # The superseded run and an unfinished one cannot run again.
    for ref in (runs["compensated"], "k-compensated", "k-running"):
        refused = invoke("rerun", ref, *app)
        assert refused.exit_code == ExitCode.INVALID_STATE, ref
    assert "names a newer run" in error_line(invoke("rerun", runs["compensated"], *app))


def test_actions_refuse_without_a_terminal_or_yes(invoke: Any, runs: dict[str, str]) -> None:
    result = invoke("retry", "k-failed", "--app", f"{MODULE}:REGISTRY")
    assert result.exit_code == ExitCode.USAGE
    assert "--yes" in error_line(result)
    doc = json.loads(invoke("status", "k-failed", "--json").stdout)
    assert doc["run"]["state"] == "failed"


# -- db and configuration ------------------------------------------------------------------


def test_db_current_downgrade_and_upgrade(invoke: Any) -> None:
    doc = json.loads(invoke("db", "current", "--json").stdout)
    assert doc["up_to_date"] is True and doc["current"] == doc["head"]
    down = invoke("db", "downgrade", "--yes")
    assert down.exit_code == 0, down.output
    assert json.loads(invoke("db", "current", "--json").stdout)["current"] is None
    missing = invoke("status")
    assert missing.exit_code == ExitCode.CONFIG
    assert "saga db upgrade" in error_line(missing)
    up = invoke("db", "upgrade")
    assert up.exit_code == 0 and "at revision" in up.stdout
    assert "secret" not in up.stdout


def test_migrating_to_an_unknown_revision_exits_2_naming_it(invoke: Any) -> None:
    for command in (["downgrade", "--yes"], ["upgrade"]):
        result = invoke("db", *command, "--revision", "nosuch")
        assert result.exit_code == ExitCode.USAGE, result.output
        line = error_line(result)
        assert "'nosuch'" in line and "unexpected" not in line
    assert json.loads(invoke("db", "current", "--json").stdout)["up_to_date"] is True


def test_the_downgrade_prompt_on_a_terminal_says_that_data_will_be_lost(db_url: str) -> None:
    controller, terminal = pty.openpty()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "saga.cli.main", "db", "downgrade"],
            cwd=ROOT, env={**os.environ, "SAGA_DATABASE_URL": db_url},
            stdin=terminal, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        os.write(controller, b"n\n")
        _, stderr = proc.communicate(timeout=60)
    finally:
        os.close(controller)
        os.close(terminal)

    assert "Downgrade schema saga" in stderr and "Data will be lost" in stderr
    assert proc.returncode == ExitCode.ERROR
    assert "not confirmed; nothing was changed" in stderr


def test_missing_database_url_exits_6(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SAGA_DATABASE_URL", raising=False)
    result = CliRunner().invoke(cli, ["status"])
    assert result.exit_code == ExitCode.CONFIG
    assert "SAGA_DATABASE_URL" in error_line(result)


def test_an_unreachable_database_exits_5_without_showing_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("SAGA_DATABASE_URL", "postgresql://saga:s3cr3t@127.0.0.1:1/saga")
    result = CliRunner().invoke(cli, ["list"])
    assert result.exit_code == ExitCode.UNAVAILABLE
    line = error_line(result)
    assert "cannot reach" in line and "s3cr3t" not in line and "***" in line


# -- through a real process ----------------------------------------------------------------


def saga_process(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``python -m saga.cli.main ARGS`` in the repository root, stdin not a terminal."""
    return subprocess.run(
        [sys.executable, "-m", "saga.cli.main", *args],
        cwd=ROOT, env={**os.environ, **env}, capture_output=True, text=True,
        stdin=subprocess.DEVNULL, timeout=60, check=False,
    )


def test_the_console_script_prints_plain_text_when_piped_and_uses_the_celery_app(
    db_url: str, runs: dict[str, str]
) -> None:
    env = {"SAGA_DATABASE_URL": db_url, "SAGA_APP": f"{MODULE}:celery_app"}
    listed = saga_process("list", "--state", "failed", env=env)
    assert listed.returncode == 0, listed.stderr
    assert "\x1b[" not in listed.stdout and runs["failed"] in listed.stdout
    unknown = saga_process("status", "nope", env=env)
    assert unknown.returncode == ExitCode.NOT_FOUND
    assert unknown.stderr.strip() == "saga: error: no run with id or key 'nope'"
    refused = saga_process("retry", "k-failed", env=env)
    assert refused.returncode == ExitCode.USAGE and "--yes" in refused.stderr
    retried = saga_process("retry", "k-failed", "--yes", env=env)
    assert retried.returncode == 0, retried.stderr
    assert "failed -> running" in retried.stdout
    bad_port = saga_process("status", env={"SAGA_DATABASE_URL": "postgresql://x:pw@127.0.0.1:1/d"})
    assert bad_port.returncode == ExitCode.UNAVAILABLE
    assert len(bad_port.stderr.strip().splitlines()) == 1 and "pw@" not in bad_port.stderr


def test_rich_output_renders_every_read_command(invoke: Any, runs: dict[str, str]) -> None:
    app = ["--app", f"{MODULE}:REGISTRY"]
    for args in (
        ["status"], ["status", "k-compensation_failed"], ["list"], ["graph", "k-failed", *app]
    ):
        result = CliRunner().invoke(cli, ["--rich", *args])
        assert result.exit_code == 0, (args, result.output)
        assert "\x1b[" in result.stdout


def test_relay_and_db_commands_document_their_options(invoke: Any) -> None:
    relay_help = invoke("relay", "--help").stdout
    assert all(flag in relay_help for flag in ("--batch-size", "--poll-interval", "--app"))
    assert "--revision" in invoke("db", "downgrade", "--help").stdout
    no_app = invoke("relay")
    assert no_app.exit_code == ExitCode.CONFIG and "--app" in error_line(no_app)


def test_the_relay_refuses_an_app_that_is_not_a_celery_app_with_exit_6(invoke: Any) -> None:
    result = invoke("relay", "--app", f"{MODULE}:ENGINE")

    assert result.exit_code == ExitCode.CONFIG, result.output
    assert "not a Celery app" in error_line(result)
