"""A workflow's step graph as SVG, drawn on the server: steps in columns by depth, arrows from
each dependency, each box coloured by the step's state in the run. Every name is escaped."""

from __future__ import annotations

from html import escape
from typing import Any

from saga.cli.graph import DOT_COLOURS, depths

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 170, 44, 60, 18, 12
FILL = DOT_COLOURS
STROKE = {
    "completed": "#2e7d32",
    "failed": "#c62828",
    "running": "#1565c0",
    "ready": "#0277bd",
    "suspended": "#5e35b1",
}


def doc_from_rows(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """A graph document from a run's step rows alone (no definition loaded: no arrows)."""
    comp = {s["step"]: s["state"] for s in steps if s["kind"] == "compensation"}
    return {
        "steps": [
            {"name": s["step"], "after": [], "depth": 0, "state": s["state"],
             "compensation_state": comp.get(s["step"])}
            for s in steps if s["kind"] == "step"
        ]
    }


def _cut(text: str, width: int = 22) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def render(doc: dict[str, Any]) -> str:
    """The graph document (``saga.cli.graph.graph_doc`` or :func:`doc_from_rows`) as SVG."""
    steps = doc["steps"]
    after = {s["name"]: tuple(s["after"]) for s in steps}
    depth = depths(after) if all(d in after for deps in after.values() for d in deps) else {}
    columns: dict[int, list[str]] = {}
    for s in steps:
        columns.setdefault(depth.get(s["name"], s.get("depth", 0)), []).append(s["name"])
    where: dict[str, tuple[int, int]] = {}
    for col, names in sorted(columns.items()):
        for row, name in enumerate(names):
            where[name] = (PAD + col * (BOX_W + GAP_X), PAD + row * (BOX_H + GAP_Y))
    width = PAD * 2 + max(len(columns), 1) * (BOX_W + GAP_X) - GAP_X
    height = PAD * 2 + max((len(n) for n in columns.values()), default=1) * (BOX_H + GAP_Y) - GAP_Y
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="step-graph" width="{width}" '
        f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
        'aria-label="step graph">',
        '<defs><marker id="arrow" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="6" '
        'markerHeight="6" orient="auto"><path d="M0,0 L10,5 L0,10 z" fill="#777"/></marker>'
        "</defs>",
    ]
    for s in steps:
        x2, y2 = where[s["name"]]
        for dep in s["after"]:
            if dep in where:
                x1, y1 = where[dep]
                parts.append(
                    f'<line x1="{x1 + BOX_W}" y1="{y1 + BOX_H // 2}" x2="{x2}" '
                    f'y2="{y2 + BOX_H // 2}" stroke="#999" marker-end="url(#arrow)"/>'
                )
    for s in steps:
        x, y = where[s["name"]]
        state = s.get("state") or "not started"
        comp = s.get("compensation_state")
        label = state if not comp else f"{state}, undo {comp}"
        name = escape(s["name"], quote=True)
        parts.append(
            f'<g class="step" data-step="{name}" data-state="{escape(state, quote=True)}">'
            f"<title>{name}: {escape(label)}</title>"
            f'<rect x="{x}" y="{y}" width="{BOX_W}" height="{BOX_H}" rx="6" '
            f'fill="{FILL.get(state, "#ffffff")}" stroke="{STROKE.get(state, "#9e9e9e")}"/>'
            f'<text x="{x + 8}" y="{y + 18}" font-size="13" font-weight="bold">'
            f"{escape(_cut(s['name']))}</text>"
            f'<text x="{x + 8}" y="{y + 35}" font-size="11" fill="#444">'
            f"{escape(_cut(label, 28))}</text></g>"
        )
    parts.append("</svg>")
    return "".join(parts)
