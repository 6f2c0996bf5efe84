"""``saga graph``: a workflow's step graph as text, Mermaid or Graphviz DOT, with each step's
state when drawn for a run."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import click

from saga.cli import queries
from saga.cli.config import CliError, ExitCode, load_registry
from saga.cli.options import app_option, config_of, db_options, json_option, output_of
from saga.cli.output import Output
from saga.definition import Workflow
from saga.errors import UnknownWorkflowError
from saga.store.base import Tables

MERMAID_STYLES = {
    "completed": "fill:#c8e6c9,stroke:#2e7d32",
    "failed": "fill:#ffcdd2,stroke:#c62828",
    "running": "fill:#bbdefb,stroke:#1565c0",
    "ready": "fill:#e1f5fe,stroke:#0277bd",
    "waiting": "fill:#eeeeee,stroke:#9e9e9e",
    "skipped": "fill:#f5f5f5,stroke:#bdbdbd,stroke-dasharray:3",
    "suspended": "fill:#ede7f6,stroke:#5e35b1,stroke-dasharray:5",
}
DOT_COLOURS = {
    "completed": "#c8e6c9",
    "failed": "#ffcdd2",
    "running": "#bbdefb",
    "ready": "#e1f5fe",
    "waiting": "#eeeeee",
    "skipped": "#f5f5f5",
    "suspended": "#ede7f6",
}


def depths(after: Mapping[str, tuple[str, ...]]) -> dict[str, int]:
    """Each step's topological depth: 0 for roots, else 1 + the deepest dependency."""
    out: dict[str, int] = {}

    def depth(name: str) -> int:
        if name not in out:
            deps = after[name]
            out[name] = 1 + max(depth(d) for d in deps) if deps else 0
        return out[name]

    for name in after:
        depth(name)
    return out


def graph_doc(
    wf: Workflow, run: Mapping[str, Any] | None, steps: list[dict[str, Any]]
) -> dict[str, Any]:
    """The graph as a JSON-able document: steps with dependencies, depth and states."""
    after = wf.after_map
    depth = depths(after)
    state = {(s["kind"], s["step"]): s["state"] for s in steps}
    return {
        "workflow": wf.name,
        "version": wf.version,
        "run": None if run is None else {"id": run["id"], "state": run["state"]},
        "steps": [
            {
                "name": name,
                "after": list(after[name]),
                "depth": depth[name],
                "has_compensation": wf[name].compensation is not None,
                "state": state.get(("step", name)) if run is not None else None,
                "compensation_state": state.get(("compensation", name)),
            }
            for name in sorted(wf.step_names, key=lambda n: (depth[n], wf.step_names.index(n)))
        ],
    }


def render_text(doc: dict[str, Any], out: Output) -> None:
    """Draw the graph in layers by depth, each step with the steps it waits for."""
    title = f"{doc['workflow']} v{doc['version']}"
    if doc["run"] is not None:
        title += f"  run {doc['run']['id']} ({doc['run']['state']})"
    out.line(title, style="bold")
    layers: dict[int, list[dict[str, Any]]] = {}
    for s in doc["steps"]:
        layers.setdefault(s["depth"], []).append(s)
    for depth in sorted(layers):
        if depth:
            out.line("   │")
            out.line("   ▼")
        for s in layers[depth]:
            label = s["name"]
            parts = [f"[{depth}] {label}"]
            if s["state"]:
                parts.append(f"({s['state']})")
            if s["has_compensation"]:
                comp = s["compensation_state"]
                parts.append(f"↺ compensation{f' ({comp})' if comp else ''}")
            if s["after"]:
                parts.append("← " + ", ".join(s["after"]))
            out.line(" " + "  ".join(parts), style=_style(s["state"]))


def _style(state: str | None) -> str | None:
    from saga.cli.output import STATE_STYLES

    return STATE_STYLES.get(state) if state else None


def _label(s: dict[str, Any]) -> str:
    label = str(s["name"])
    if s["state"]:
        label += f" ({s['state']})"
    if s["compensation_state"]:
        label += f" ↺ {s['compensation_state']}"
    return label.replace('"', "'")


def render_mermaid(doc: dict[str, Any]) -> str:
    """The graph as a Mermaid flowchart (node ids are ``s0``, ``s1``...; labels are names)."""
    ids = {s["name"]: f"s{i}" for i, s in enumerate(doc["steps"])}
    lines = ["flowchart TD"]
    for s in doc["steps"]:
        lines.append(f'    {ids[s["name"]]}["{_label(s)}"]')
    for s in doc["steps"]:
        lines.extend(f"    {ids[d]} --> {ids[s['name']]}" for d in s["after"])
    used = sorted({s["state"] for s in doc["steps"] if s["state"] in MERMAID_STYLES})
    for state in used:
        lines.append(f"    classDef {state} {MERMAID_STYLES[state]}")
        members = ",".join(ids[s["name"]] for s in doc["steps"] if s["state"] == state)
        lines.append(f"    class {members} {state}")
    return "\n".join(lines)


def render_dot(doc: dict[str, Any]) -> str:
    """The graph as Graphviz DOT."""
    name = f"{doc['workflow']} v{doc['version']}".replace('"', "'")
    lines = [f'digraph "{name}" {{', "    rankdir=TB;", "    node [shape=box, style=rounded];"]
    for s in doc["steps"]:
        attrs = f'label="{_label(s)}"'
        colour = DOT_COLOURS.get(s["state"] or "")
        if colour:
            attrs += f', style="rounded,filled", fillcolor="{colour}"'
        lines.append(f'    "{s["name"]}" [{attrs}];')
    for s in doc["steps"]:
        lines.extend(f'    "{d}" -> "{s["name"]}";' for d in s["after"])
    lines.append("}")
    return "\n".join(lines)


@click.command()
@click.argument("target")
@click.option("--version", "version", type=int, help="Workflow version (default: the latest).")
@click.option(
    "--format", "fmt", type=click.Choice(["text", "mermaid", "dot"]), default="text",
    show_default=True,
)
@json_option
@app_option
@db_options
@click.pass_context
def graph(
    ctx: click.Context, target: str, version: int | None, fmt: str, as_json: bool
) -> None:
    """Draw the step graph of workflow TARGET, or of run TARGET (id or business key) with
    each step's state. Needs --app for the registry."""
    config = config_of(ctx)
    registry, saga = load_registry(config.require_app(), config)
    run: dict[str, Any] | None = None
    steps: list[dict[str, Any]] = []
    if any(wf.name == target for wf in registry):
        try:
            wf = registry.get(target, version)
        except UnknownWorkflowError as exc:
            raise CliError(str(exc), ExitCode.NOT_FOUND) from None
    else:
        if config.database_url or saga is None:
            engine, tables = config.engine(), config.tables()
        else:
            engine, tables = saga.engine, Tables(saga.settings.schema)
        with engine.connect() as conn:
            try:
                run = queries.find_run(conn, tables, target)
            except CliError as exc:
                raise CliError(
                    f"no workflow named {target!r} is registered, and {exc.message}",
                    ExitCode.NOT_FOUND,
                ) from None
            steps = queries.run_steps(conn, tables, run["id"])
        try:
            wf = registry.get(run["workflow"], run["version"])
        except UnknownWorkflowError as exc:
            raise CliError(f"run {run['id']}: {exc}", ExitCode.NOT_FOUND) from None
    doc = graph_doc(wf, run, steps)
    out = output_of(ctx)
    if as_json:
        out.json(doc)
    elif fmt == "mermaid":
        click.echo(render_mermaid(doc))
    elif fmt == "dot":
        click.echo(render_dot(doc))
    else:
        render_text(doc, out)
