"""The dashboard's Starlette application.

Pages: ``/`` (overview), ``/runs`` (filterable, paged list), ``/runs/{run}`` (one run: its
step graph, updated live while the run moves, timeline, input, results, errors, tracebacks and
the operator actions). JSON under ``/api/...`` (the same documents as ``saga status --json``),
``/metrics`` for Prometheus. Everything reads through :mod:`saga.cli.docs` and
:mod:`saga.cli.queries`, like the CLI.

Operator actions are POSTs carrying a CSRF token (double submit: a ``SameSite=Strict`` cookie
and a form field) and the operator token; they are refused unless ``SAGA_DASHBOARD_TOKEN`` is
configured, and need the workflow definitions (``--app``). Templates autoescape everything.
"""

from __future__ import annotations

import contextlib
import hmac
import json
import secrets
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

from jinja2 import Environment, PackageLoader, select_autoescape
from sqlalchemy import Engine
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from saga import tracebacks
from saga.app import Saga
from saga.cli import docs, queries
from saga.cli.config import CliError
from saga.cli.graph import graph_doc
from saga.cli.output import fmt_duration, fmt_time, to_json
from saga.dashboard import svg
from saga.db.states import RUN_ACTIVE, RUN_STATES
from saga.errors import InvalidTransitionError, SagaError, UnknownRunError, UnknownWorkflowError
from saga.store.base import Tables

CSRF_COOKIE = "saga_csrf"
PAGE_SIZE = 50
ACTIONS = ("retry", "cancel", "resolve", "signal")
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data:; style-src 'self'; script-src 'self'; "
        "frame-ancestors 'none'; form-action 'self'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


def _json(doc: Any, status: int = 200) -> Response:
    return Response(to_json(doc), status_code=status, media_type="application/json")


class Dashboard:
    """The pages, the API and the actions over one database (and optionally one engine)."""

    def __init__(
        self, engine: Engine, tables: Tables, saga: Saga | None, token: str | None
    ) -> None:
        self.engine = engine
        self.tables = tables
        self.saga = saga
        self.token = token
        self.env = Environment(
            loader=PackageLoader("saga.dashboard", "templates"),
            autoescape=select_autoescape(default=True, default_for_string=True),
        )
        self.env.filters.update(
            time=fmt_time, duration=fmt_duration, json=to_json,
            compact=lambda v: json.dumps(v, default=str, ensure_ascii=False),
            traceback=tracebacks.render,
        )

    # -- rendering -----------------------------------------------------------------------------

    def page(self, request: Request, template: str, status: int = 200, **ctx: Any) -> Response:
        """Render ``template`` with the CSRF token (set as a cookie if the browser has none)."""
        csrf = request.cookies.get(CSRF_COOKIE) or secrets.token_urlsafe(32)
        html = self.env.get_template(template).render(
            csrf=csrf, actions_enabled=self.token is not None and self.saga is not None,
            read_only_reason=self._read_only_reason(), now=datetime.now(UTC), **ctx,
        )
        response = HTMLResponse(html, status_code=status, headers=SECURITY_HEADERS)
        if request.cookies.get(CSRF_COOKIE) != csrf:
            response.set_cookie(CSRF_COOKIE, csrf, httponly=True, samesite="strict")
        return response

    def message(self, request: Request, status: int, title: str, text: str) -> Response:
        """A page saying why something was refused or not found."""
        return self.page(request, "message.html", status=status, title=title, text=text)

    def _read_only_reason(self) -> str | None:
        if self.token is None:
            return "read-only: operator actions are off (set SAGA_DASHBOARD_TOKEN to enable them)"
        if self.saga is None:
            return "read-only: operator actions need the workflow definitions (--app)"
        return None

    # -- reads ---------------------------------------------------------------------------------

    def _overview(self) -> dict[str, Any]:
        with self.engine.connect() as conn:
            return docs.overview(conn, self.tables)

    def _list(self, request: Request) -> dict[str, Any]:
        q = request.query_params
        states = tuple(s for s in q.getlist("state") if s in RUN_STATES)
        before = before_id = None
        if q.get("before"):
            stamp, _, rid = q["before"].partition(",")
            try:
                before = datetime.fromisoformat(stamp)
                before_id = uuid.UUID(rid) if rid else None
            except ValueError:
                raise CliError("bad cursor") from None
        f = queries.ListFilter(
            states=states, workflow=q.get("workflow") or None, key=q.get("key") or None,
            before=before, before_id=before_id, limit=PAGE_SIZE + 1,
        )
        with self.engine.connect() as conn:
            rows = queries.list_runs(conn, self.tables, f)
        more = len(rows) > PAGE_SIZE
        rows = rows[:PAGE_SIZE]
        cursor = f"{rows[-1]['created_at'].isoformat()},{rows[-1]['id']}" if more else None
        return {"runs": rows, "next_before": cursor, "filter": {
            "states": list(states), "workflow": f.workflow, "key": f.key}}

    def _run(self, ref: str) -> dict[str, Any]:
        with self.engine.connect() as conn:
            doc = docs.run_detail(conn, self.tables, ref)
        doc["graph"] = self._graph(doc)
        return doc

    def _graph(self, doc: dict[str, Any]) -> dict[str, Any]:
        rows = doc["steps"] + doc["compensations"]
        if self.saga is not None:
            run = doc["run"]
            try:
                wf = self.saga.registry.get(run["workflow"], run["version"])
            except UnknownWorkflowError:
                pass
            else:
                return graph_doc(wf, run, rows)
        return svg.doc_from_rows(rows)

    # -- endpoints -----------------------------------------------------------------------------

    def overview_page(self, request: Request) -> Response:
        """``GET /``."""
        return self.page(request, "overview.html", doc=self._overview())

    def runs_page(self, request: Request) -> Response:
        """``GET /runs``."""
        try:
            doc = self._list(request)
        except CliError as exc:
            return self.message(request, 400, "Bad request", exc.message)
        nxt = None
        if doc["next_before"]:
            params = [(k, v) for k, v in request.query_params.multi_items() if k != "before"]
            nxt = "/runs?" + urlencode([*params, ("before", doc["next_before"])])
        return self.page(
            request, "runs.html", doc=doc, states=RUN_STATES, next_url=nxt,
            paged=bool(request.query_params.get("before")),
        )

    def run_page(self, request: Request) -> Response:
        """``GET /runs/{ref}``."""
        return self._with_run(request, lambda doc: self.page(
            request, "run.html", doc=doc, svg=svg.render(doc["graph"]),
            done=request.query_params.get("done"), active=doc["run"]["state"] in RUN_ACTIVE,
        ))

    def run_live(self, request: Request) -> Response:
        """``GET /runs/{ref}/live``: the part of the run page that changes as it moves."""
        return self._with_run(request, lambda doc: self.page(
            request, "_live.html", doc=doc, svg=svg.render(doc["graph"]),
        ))

    def run_svg(self, request: Request) -> Response:
        """``GET /runs/{ref}/graph.svg``."""
        return self._with_run(request, lambda doc: Response(
            svg.render(doc["graph"]), media_type="image/svg+xml", headers=SECURITY_HEADERS,
        ))

    def _with_run(self, request: Request, show: Callable[[dict[str, Any]], Response]) -> Response:
        try:
            doc = self._run(request.path_params["ref"])
        except CliError as exc:
            return self.message(request, 404, "No such run", exc.message)
        return show(doc)

    def api_overview(self, request: Request) -> Response:
        """``GET /api/overview``: as ``saga status --json``."""
        return _json(self._overview())

    def api_runs(self, request: Request) -> Response:
        """``GET /api/runs?state=&workflow=&key=&before=``: as ``saga list --json``."""
        try:
            doc = self._list(request)
        except CliError as exc:
            return _json({"error": exc.message}, 400)
        return _json({"runs": doc["runs"], "next_before": doc["next_before"]})

    def api_run(self, request: Request) -> Response:
        """``GET /api/runs/{ref}``: as ``saga status RUN --json``, plus the graph."""
        try:
            return _json(self._run(request.path_params["ref"]))
        except CliError as exc:
            return _json({"error": exc.message}, 404)

    def api_run_state(self, request: Request) -> Response:
        """``GET /api/runs/{ref}/state``: what the run page polls (small)."""
        try:
            doc = self._run(request.path_params["ref"])
        except CliError as exc:
            return _json({"error": exc.message}, 404)
        return _json({
            "id": doc["run"]["id"], "state": doc["run"]["state"],
            "active": doc["run"]["state"] in RUN_ACTIVE, "history": len(doc["history"]),
            "steps": [[s["kind"], s["step"], s["state"], s["attempt"]]
                      for s in doc["steps"] + doc["compensations"]],
        })

    def metrics(self, request: Request) -> Response:
        """``GET /metrics``: saga's metrics in the Prometheus text format."""
        from saga import prometheus

        try:
            return Response(prometheus.exposition(), media_type=prometheus.CONTENT_TYPE)
        except ImportError:
            return Response("the saga[metrics] extra is not installed\n", status_code=503)

    async def action(self, request: Request) -> Response:
        """``POST /runs/{ref}/{action}``: retry (optionally from a step), cancel, resolve, or
        signal (``name`` and a JSON ``data`` payload, as ``saga signal``)."""
        form = await request.form()
        action = request.path_params["action"]
        ref = request.path_params["ref"]
        if action not in ACTIONS:
            return self.message(request, 404, "No such action", f"unknown action {action!r}")
        reason = self._read_only_reason()
        if reason is not None:
            return self.message(request, 403, "Refused", reason)
        cookie = request.cookies.get(CSRF_COOKIE, "")
        if not cookie or not hmac.compare_digest(cookie, str(form.get("csrf", ""))):
            return self.message(request, 403, "Refused", "the CSRF check failed: reload the page")
        assert self.token is not None and self.saga is not None
        if not hmac.compare_digest(self.token.encode(), str(form.get("token", "")).encode()):
            return self.message(request, 403, "Refused", "wrong or missing operator token")
        fields = {k: str(form.get(k, "")).strip() for k in ("reason", "from_step", "name", "data")}
        try:
            done = self._act(action, ref, fields)
        except UnknownRunError as exc:
            return self.message(request, 404, "No such run", str(exc))
        except CliError as exc:
            return self.message(request, 400, "Bad request", exc.message)
        except (InvalidTransitionError, SagaError) as exc:
            return self.message(request, 409, "Not allowed", str(exc))
        return RedirectResponse(f"/runs/{ref}?{urlencode({'done': done})}", status_code=303)

    def _act(self, action: str, ref: str, fields: dict[str, str]) -> str:
        """Carry out ``action`` through the engine's operator calls (the CLI's); what was
        done, for the page."""
        assert self.saga is not None
        if action == "signal":
            try:
                payload = json.loads(fields["data"] or "null")
            except ValueError as exc:
                raise CliError(f"the payload is not JSON: {exc}") from None
            outcome = self.saga.signal_now(ref, fields["name"], payload)
            return f"signal {fields['name']!r}: {outcome}"
        return f"{action}: the run is now {self._change(action, ref, fields)}"

    def _change(self, action: str, ref: str, fields: dict[str, str]) -> str:
        assert self.saga is not None
        reason = fields["reason"] or None
        if action == "retry":
            return self.saga.retry(ref, fields["from_step"] or None)
        if action == "cancel":
            return self.saga.cancel(ref, reason)
        if reason is None:
            raise InvalidTransitionError("a reason is required to resolve a run")
        return self.saga.resolve(ref, reason)


def create_app(
    engine: Engine, tables: Tables, *, saga: Saga | None = None, token: str | None = None
) -> Starlette:
    """The dashboard over ``engine``'s schema ``tables``; ``saga`` (the engine with the
    workflow registry) draws graphs and carries out actions, allowed only with ``token``."""
    from saga import metrics, prometheus
    from saga.registry import Registry
    from saga.settings import Settings

    d = Dashboard(engine, tables, saga, token)
    # The gauges read the database of an engine; without --app, one with no workflows.
    observed = saga or Saga(Registry(), engine=engine, settings=Settings(schema=tables.schema))
    with contextlib.suppress(SagaError):  # without the metrics extra, /metrics says so
        prometheus.enable()
    metrics.observe(observed)
    routes = [
        Route("/", d.overview_page),
        Route("/runs", d.runs_page),
        Route("/runs/{ref}", d.run_page),
        Route("/runs/{ref}/live", d.run_live),
        Route("/runs/{ref}/graph.svg", d.run_svg),
        Route("/runs/{ref}/{action}", d.action, methods=["POST"]),
        Route("/api/overview", d.api_overview),
        Route("/api/runs", d.api_runs),
        Route("/api/runs/{ref}", d.api_run),
        Route("/api/runs/{ref}/state", d.api_run_state),
        Route("/metrics", d.metrics),
        Route("/healthz", lambda request: JSONResponse({"ok": True})),
        Mount("/static", StaticFiles(packages=[("saga.dashboard", "static")]), name="static"),
    ]
    app = Starlette(routes=routes)
    app.state.dashboard = d
    app.state.observed = observed  # metrics holds engines weakly
    return app
