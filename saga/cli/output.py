"""Printing: ``rich`` tables in a terminal, plain aligned text when piped, JSON on request."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import click

STATE_STYLES = {
    "running": "cyan",
    "compensating": "yellow",
    "cancelling": "yellow",
    "completed": "green",
    "compensated": "magenta",
    "failed": "red",
    "cancelled": "bright_black",
    "compensation_failed": "bold red",
    "resolved": "blue",
    "waiting": "bright_black",
    "ready": "cyan",
    "skipped": "bright_black",
    "suspended": "blue",
}
"""The colour of each run and step state in a terminal."""

ID_COLUMNS = frozenset({"id", "run", "last run"})
"""Columns holding run ids, never wrapped or cut in a terminal."""


def _default(value: object) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, timedelta):
        return value.total_seconds()
    if isinstance(value, uuid.UUID | Decimal):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def to_json(doc: Any) -> str:
    """``doc`` as indented JSON (datetimes as ISO 8601, durations as seconds)."""
    return json.dumps(doc, default=_default, indent=2, sort_keys=False)


def fmt_time(value: datetime | None) -> str:
    """A timestamp for humans: ``2024-05-01 12:00:03`` (UTC), or ``-``."""
    if value is None:
        return "-"
    return value.strftime("%Y-%m-%d %H:%M:%S")


def fmt_duration(seconds: float | None) -> str:
    """``1h02m``, ``3m07s``, ``4.2s`` or ``-``."""
    if seconds is None:
        return "-"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{minutes:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def between(start: datetime | None, end: datetime | None, now: datetime) -> float | None:
    """Seconds from ``start`` to ``end`` (or ``now`` while unfinished)."""
    if start is None:
        return None
    return ((end or now) - start).total_seconds()


def one_line(text: object, width: int = 80) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    flat = " ".join(str(text).split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


class Output:
    """Where a command writes: a rich console in a terminal, plain text otherwise."""

    def __init__(self, rich: bool | None = None) -> None:
        self.rich = sys.stdout.isatty() if rich is None else rich
        self._console: Any = None

    @property
    def console(self) -> Any:
        """The ``rich`` console (made on first use, on the current stdout)."""
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=sys.stdout, force_terminal=self.rich, highlight=False)
        return self._console

    def json(self, doc: Any) -> None:
        """Print ``doc`` as JSON."""
        click.echo(to_json(doc))

    def line(self, text: str = "", style: str | None = None) -> None:
        """Print one line (styled in a terminal)."""
        if self.rich and style:
            from rich.text import Text

            self.console.print(Text(text, style=style))
        elif self.rich:
            from rich.text import Text

            self.console.print(Text(text))
        else:
            click.echo(text)

    def state(self, state: str) -> str:
        """``state`` as rich markup in a terminal, as is otherwise."""
        if not self.rich:
            return state
        return f"[{STATE_STYLES.get(state, 'default')}]{state}[/]"

    def table(
        self,
        title: str | None,
        columns: Sequence[str],
        rows: Sequence[Sequence[object]],
        *,
        state_column: int | None = None,
    ) -> None:
        """Print a table; ``state_column`` is coloured by state in a terminal."""
        cells = [["-" if c is None else str(c) for c in row] for row in rows]
        if self.rich:
            from rich.markup import escape
            from rich.table import Table

            table = Table(title=title, title_justify="left", header_style="bold")
            for col in columns:
                # Run ids are printed whole: a cut id cannot be pasted back.
                whole = col in ID_COLUMNS
                table.add_column(col, no_wrap=whole, min_width=36 if whole else None)
            for row in cells:
                shown = [escape(c) for c in row]
                if state_column is not None:
                    shown[state_column] = self.state(row[state_column])
                table.add_row(*shown)
            self.console.print(table)
            return
        if title:
            click.echo(title)
        header = [c.upper() for c in columns]
        widths = [len(h) for h in header]
        for row in cells:
            widths = [max(w, len(c)) for w, c in zip(widths, row, strict=False)]
        for row in [header, *cells]:
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=False)).rstrip())

    def fields(self, title: str | None, pairs: Sequence[tuple[str, object]]) -> None:
        """Print ``name: value`` lines under an optional title."""
        if title:
            self.line(title, style="bold")
        width = max((len(k) for k, _ in pairs), default=0)
        for key, value in pairs:
            text = "-" if value is None else str(value)
            if self.rich:
                from rich.markup import escape

                shown = self.state(text) if key == "state" else escape(text)
                self.console.print(f"  [bold]{escape(key.ljust(width))}[/]  {shown}")
            else:
                click.echo(f"  {key.ljust(width)}  {text}")
