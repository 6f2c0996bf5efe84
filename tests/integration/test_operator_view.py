"""The operator's view on a real database: run-id prefixes, run detail with tracebacks, run
counts kept by triggers, retention, and the dashboard's pages, API and guarded actions (over
HTTP in process)."""

from __future__ import annotations

import json
import re
import uuid
from typing import Any

import pytest
from click.testing import CliRunner
from sqlalchemy import text
from starlette.testclient import TestClient

from saga import Saga, UnknownRunError
from saga.cli.main import cli
from saga.dashboard.app import CSRF_COOKIE, create_app
from saga.store import counts
from saga.testing import drain

TRACEBACK = {
    "frames": [
        {"file": "shop/payments.py", "line": 42, "function": "charge_card",
         "code": "raise CardDeclined(token)", "own": True},
    ],
    "omitted": 0,
}


def sql(saga: Saga, statement: str, **params: Any) -> Any:
    with saga.engine.begin() as conn:
        return conn.execute(text(statement), params)


def count(saga: Saga, statement: str, **params: Any) -> int:
    return int(sql(saga, statement, **params).scalar_one())


def invoke(db_url: str, *args: str) -> Any:
    return CliRunner().invoke(
        cli, ["--plain", "--database-url", db_url, *args], catch_exceptions=False
    )


def insert_run(saga: Saga, run_id: str, state: str = "running", **extra: Any) -> str:
    sql(
        saga,
        "INSERT INTO saga.runs (id, workflow, version, definition_hash, state, input,"
        " steps_remaining, finished_at, created_at)"
        " VALUES (:id, 'it.linear', 1, 'h', :state, CAST(:input AS jsonb), 0,"
        " CASE WHEN :finished THEN now() END, now())",
        id=run_id, state=state, input=json.dumps(extra.get("input", {})),
        finished=state not in ("running", "compensating", "cancelling", "compensation_failed"),
    )
    return run_id


# -- run ids by prefix -------------------------------------------------------------------------


def test_a_unique_prefix_of_eight_characters_names_a_run_and_an_ambiguous_one_is_refused(
    saga_engine: Saga, db_url: str
) -> None:
    a = insert_run(saga_engine, "abcdef12-0000-4000-8000-000000000001")
    insert_run(saga_engine, "abcdef12-9999-4000-8000-000000000002")

    with saga_engine.engine.connect() as conn:
        assert saga_engine.resolve_run(conn, "abcdef12-0") == a
        with pytest.raises(UnknownRunError, match="ambiguous"):
            saga_engine.resolve_run(conn, "abcdef12")
        with pytest.raises(UnknownRunError, match="no run"):
            saga_engine.resolve_run(conn, "abcdef1")  # seven characters are not a prefix

    ambiguous = invoke(db_url, "status", "abcdef12")
    assert ambiguous.exit_code == 3
    assert ambiguous.stderr.strip() == (
        "saga: error: run id prefix 'abcdef12' is ambiguous: it names more than one run; "
        "give more characters"
    )
    found = invoke(db_url, "status", "abcdef120000", "--json")
    assert found.exit_code == 0, found.output
    assert json.loads(found.stdout)["run"]["id"] == a


# -- run detail ----------------------------------------------------------------------------------


def test_status_of_a_run_shows_its_input_results_and_the_latest_error_with_its_traceback(
    saga_engine: Saga, db_url: str
) -> None:
    run_id = saga_engine.start_now("it.linear", {"order": 7, "note": "x" * 300}).run_id
    drain(saga_engine)
    error = {"type": "shop.CardDeclined", "message": "card declined", "attempt": 2,
             "traceback": TRACEBACK}
    sql(saga_engine, "UPDATE saga.step_runs SET state = 'failed', error = CAST(:e AS jsonb)"
        " WHERE run_id = :id AND step = 'c'", id=run_id, e=json.dumps(error))
    sql(saga_engine, "UPDATE saga.runs SET state = 'failed', error = CAST(:e AS jsonb)"
        " WHERE id = :id", id=run_id,
        e=json.dumps({"step": "c", "kind": "step", "type": error["type"],
                      "message": error["message"], "attempt": 2}))

    shown = invoke(db_url, "status", run_id)
    assert shown.exit_code == 0, shown.output
    out = shown.stdout
    assert 'input     {"note": "xxx' in out
    assert "Latest error in step 'c', attempt 2" in out
    assert "shop.CardDeclined: card declined" in out
    assert '> File "shop/payments.py", line 42, in charge_card' in out
    assert "raise CardDeclined(token)" in out
    assert "x" * 300 not in out  # the input is bounded ...
    whole = invoke(db_url, "status", run_id, "--full").stdout  # ... unless --full
    assert "x" * 300 in whole and '"order": 7' in whole

    doc = json.loads(invoke(db_url, "status", run_id, "--json").stdout)
    assert doc["run"]["input"]["note"] == "x" * 300
    assert {s["step"]: s["result"] for s in doc["steps"]} == {"a": 1, "b": 2, "c": 3}
    assert doc["latest_error"]["traceback"] == TRACEBACK  # taken from the failed step's row


def test_a_run_whose_error_has_no_traceback_is_shown_without_one(
    saga_engine: Saga, db_url: str
) -> None:
    run_id = insert_run(saga_engine, str(uuid.uuid4()), "failed")
    sql(saga_engine, """UPDATE saga.runs SET error = '{"message": "old style"}' WHERE id = :id""",
        id=run_id)
    shown = invoke(db_url, "status", run_id)
    assert shown.exit_code == 0, shown.output
    assert "error: old style" in shown.stdout
    assert json.loads(invoke(db_url, "status", run_id, "--json").stdout)["latest_error"] == {
        "message": "old style"
    }


# -- run counts ----------------------------------------------------------------------------------


def group_by(saga: Saga) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    with saga.engine.connect() as conn:
        for wf, state, n in conn.execute(
            text("SELECT workflow, state, count(*) FROM saga.runs GROUP BY 1, 2")
        ):
            out.setdefault(wf, {})[state] = int(n)
    return out


def read_counts(saga: Saga, fold: bool = False) -> dict[str, dict[str, int]]:
    with saga.engine.begin() as conn:
        if fold:
            counts.fold_in_tx(conn, saga.tables)
        return counts.runs_by_state(conn, saga.tables)


def test_the_counts_follow_runs_through_finishing_retrying_and_deleting(
    saga_engine: Saga,
) -> None:
    ids = [saga_engine.start_now("it.linear", {}).run_id for _ in range(3)]
    assert read_counts(saga_engine) == {"it.linear": {"running": 3}}
    drain(saga_engine)
    assert read_counts(saga_engine) == group_by(saga_engine) == {"it.linear": {"completed": 3}}
    sql(saga_engine, "UPDATE saga.runs SET state = 'failed' WHERE id = :id", id=ids[0])
    assert read_counts(saga_engine, fold=True) == group_by(saga_engine)
    sql(saga_engine, "UPDATE saga.runs SET state = 'running' WHERE id = :id", id=ids[0])
    sql(saga_engine, "DELETE FROM saga.runs WHERE id = :id", id=ids[1])
    assert read_counts(saga_engine) == group_by(saga_engine) == {
        "it.linear": {"running": 1, "completed": 1}
    }
    assert read_counts(saga_engine, fold=True) == group_by(saga_engine)
    assert count(saga_engine, "SELECT count(*) FROM saga.run_count_deltas") == 0


# -- retention -----------------------------------------------------------------------------------

TABLES = ("runs", "step_runs", "history", "outbox")


def rows_of(saga: Saga, run_ids: list[str]) -> dict[str, int]:
    return {
        t: count(saga, f"SELECT count(*) FROM saga.{t} WHERE "
                 f"{'id' if t == 'runs' else 'run_id'} = ANY(CAST(:ids AS uuid[]))", ids=run_ids)
        for t in TABLES
    }


def test_prune_deletes_old_finished_runs_with_their_rows_and_never_touches_unfinished_ones(
    saga_engine: Saga, db_url: str
) -> None:
    finished = [saga_engine.start_now("it.linear", {}).run_id for _ in range(5)]
    drain(saga_engine)
    recent = saga_engine.start_now("it.linear", {}).run_id
    drain(saga_engine)
    unfinished = [saga_engine.start_now("it.linear", {}).run_id for _ in range(2)]
    sql(saga_engine, "UPDATE saga.runs SET state = 'compensation_failed' WHERE id = :id",
        id=unfinished[1])
    old = finished + unfinished
    sql(saga_engine, "UPDATE saga.runs SET created_at = now() - interval '40 days',"
        " finished_at = CASE WHEN finished_at IS NOT NULL THEN now() - interval '39 days' END"
        " WHERE id = ANY(CAST(:ids AS uuid[]))", ids=old)
    before_finished = rows_of(saga_engine, finished)
    before_unfinished = rows_of(saga_engine, unfinished)
    assert before_finished["step_runs"] == 15 and before_finished["history"] > 15

    dry = invoke(db_url, "prune", "--finished-before", "30d", "--dry-run", "--json")
    assert json.loads(dry.stdout)["runs"] == 5
    assert rows_of(saga_engine, finished) == before_finished

    done = invoke(db_url, "prune", "--finished-before", "30d", "--batch-size", "2", "--yes")
    assert done.exit_code == 0, done.output
    assert done.stdout.strip() == "deleted 5 run(s) finished more than 30d ago (completed 5)"
    assert rows_of(saga_engine, finished) == dict.fromkeys(TABLES, 0)
    assert rows_of(saga_engine, unfinished) == before_unfinished
    assert rows_of(saga_engine, [recent])["runs"] == 1
    assert read_counts(saga_engine, fold=True) == group_by(saga_engine)


def test_prune_refuses_an_unfinished_state_and_a_bad_duration(db_url: str) -> None:
    assert invoke(db_url, "prune", "--finished-before", "30d", "--state", "running").exit_code == 2
    bad = invoke(db_url, "prune", "--finished-before", "soon")
    assert bad.exit_code == 2
    assert "is not a duration" in bad.stderr


# -- the dashboard over HTTP (in process) --------------------------------------------------------


def client(saga: Saga, token: str | None = "s3cret") -> TestClient:
    return TestClient(create_app(saga.engine, saga.tables, saga=saga, token=token))


def csrf_of(c: TestClient, run_id: str) -> str:
    page = c.get(f"/runs/{run_id}")
    found = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert found and c.cookies.get(CSRF_COOKIE) == found[1]
    return found[1]


def test_an_action_is_refused_without_a_configured_token_a_csrf_token_or_the_right_token(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now("it.linear", {}).run_id
    off = client(saga_engine, token=None)
    refused = off.post(f"/runs/{run_id}/cancel", data={"csrf": csrf_of(off, run_id)})
    assert refused.status_code == 403 and "SAGA_DASHBOARD_TOKEN" in refused.text

    on = client(saga_engine)
    csrf = csrf_of(on, run_id)
    assert on.post(f"/runs/{run_id}/cancel", data={"token": "s3cret"}).status_code == 403
    wrong = on.post(f"/runs/{run_id}/cancel", data={"csrf": csrf, "token": "guess"})
    assert wrong.status_code == 403 and "operator token" in wrong.text
    assert saga_engine.get_run(run_id)["state"] == "running"

    ok = on.post(f"/runs/{run_id}/cancel", data={"csrf": csrf, "token": "s3cret",
                                                 "reason": "customer asked"},
                 follow_redirects=False)
    assert ok.status_code == 303
    assert saga_engine.get_run(run_id)["state"] in ("cancelling", "cancelled")
    again = on.post(f"/runs/{run_id}/cancel", data={"csrf": csrf, "token": "s3cret"})
    assert again.status_code == 409


def test_pages_escape_what_users_control_and_the_api_serves_the_cli_documents(
    saga_engine: Saga,
) -> None:
    run_id = saga_engine.start_now(
        "it.linear", {"note": "<script>alert(1)</script>"}, key="<b>key</b>"
    ).run_id
    sql(saga_engine, "INSERT INTO saga.step_runs (run_id, kind, step, state, pending_deps)"
        " VALUES (:id, 'step', '<script>x()</script>', 'waiting', 1)", id=run_id)
    c = client(saga_engine)
    for path in (f"/runs/{run_id}", "/runs", f"/runs/{run_id}/graph.svg"):
        body = c.get(path).text
        assert "<script>alert" not in body and "<script>x()" not in body and "<b>key" not in body
    page = c.get(f"/runs/{run_id}").text
    assert "&lt;script&gt;x()&lt;/script&gt;" in page
    assert "&lt;b&gt;key&lt;/b&gt;" in page

    doc = c.get(f"/api/runs/{run_id[:8]}").json()
    assert doc["run"]["id"] == run_id and doc["run"]["input"]["note"].startswith("<script>")
    assert c.get("/api/overview").json()["runs"]["by_state"] == {"running": 1}
    assert c.get("/api/runs?state=running").json()["runs"][0]["id"] == run_id
    assert c.get("/runs/nope").status_code == 404


def test_a_narrow_terminal_still_gets_whole_run_ids(saga_engine: Saga, db_url: str) -> None:
    run_id = saga_engine.start_now("it.linear", {}, key="k").run_id
    result = CliRunner().invoke(
        cli, ["--rich", "--database-url", db_url, "list"], env={"COLUMNS": "80"},
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    assert run_id in result.stdout


def test_the_relays_housekeeping_registers_it_folds_counts_and_applies_retention(
    saga_engine: Saga,
) -> None:
    from saga.housekeeping import Housekeeping

    old = saga_engine.start_now("it.linear", {}).run_id
    drain(saga_engine)
    sql(saga_engine, "UPDATE saga.runs SET created_at = now() - interval '3 days',"
        " finished_at = now() - interval '3 days' WHERE id = :id", id=old)
    kept = saga_engine.start_now("it.linear", {}).run_id
    chores = Housekeeping(saga_engine, retention=2 * 86400)
    chores.start()
    assert count(saga_engine, "SELECT count(*) FROM saga.processes WHERE kind = 'relay'") == 1
    chores.tick()
    assert rows_of(saga_engine, [old]) == dict.fromkeys(TABLES, 0)
    assert rows_of(saga_engine, [kept])["runs"] == 1
    chores.tick()  # the fold is not due again yet; the deltas of the prune wait for it
    with saga_engine.engine.begin() as conn:
        counts.fold_in_tx(conn, saga_engine.tables)
    assert count(saga_engine, "SELECT coalesce(sum(n), 0) FROM saga.run_counts") == 0
    chores.stop()
    assert count(saga_engine, "SELECT count(*) FROM saga.processes") == 0


def test_a_process_registers_beats_and_leaves_and_stale_rows_are_pruned(
    saga_engine: Saga,
) -> None:
    from saga.presence import Presence

    sql(saga_engine, "INSERT INTO saga.processes (id, kind, name, host, pid, version,"
        " last_seen_at) VALUES (gen_random_uuid(), 'worker', 'ghost', 'h', 1, 'x',"
        " now() - interval '2 days')")
    me = Presence(saga_engine, "worker", name="w1", queues=["b", "a"], interval=60)
    assert me.register()
    rows = sql(saga_engine, "SELECT name, queues, definitions FROM saga.processes").all()
    assert [r[0] for r in rows] == ["w1"]  # the ghost not seen for two days is gone
    assert rows[0][1] == ["a", "b"]
    assert {d["name"] for d in rows[0][2]} == {"it.linear", "it.diamond", "it.fan50"}
    assert not me.beat()  # within its interval: nothing written
    sql(saga_engine, "DELETE FROM saga.processes")
    assert me.beat(force=True)  # its row was gone: registered again
    assert count(saga_engine, "SELECT count(*) FROM saga.processes WHERE name = 'w1'") == 1
    me.remove()
    assert count(saga_engine, "SELECT count(*) FROM saga.processes") == 0
