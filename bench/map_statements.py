"""Statements a map over a list costs, counted in-process, for maps of 100, 1,000 and 10,000
items: the count should grow linearly (about the same number of statements per item at every
size), never with a scan over the siblings per completion.

    .venv/bin/python bench/map_statements.py [--sizes 100,1000,10000]

Drives saga in this process against a scratch database (``maps_bench_statements``,
recreated) with :func:`saga.testing.drain`: a run of ``source -> map -> join`` per size, every
instance a no-op. Every statement sent is counted: those through SQLAlchemy with its
``before_cursor_execute`` event, and the hot path's claims and completions, which run straight
on psycopg (:class:`saga.store.base.Statement`), by wrapping ``Statement.first``. The figures
include the in-process relay's statements (publishing batches of 50, looking for due timers).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.throughput import recreate_database  # noqa: E402
from saga import Registry, Saga, Settings, StepContext, Workflow  # noqa: E402
from saga.store.base import Statement  # noqa: E402
from saga.testing import drain  # noqa: E402

DB_NAME = "maps_bench_statements"
URL = f"postgresql+psycopg://postgres@127.0.0.1:5432/{DB_NAME}"


def source(ctx: StepContext) -> list[int]:
    return list(range(int(ctx.input["n"])))


def each(ctx: StepContext) -> int:
    return int(ctx.item) + 1


def join(ctx: StepContext) -> int:
    return len(ctx.results["each"])


def workflow() -> Workflow:
    wf = Workflow("bench.map")
    wf.add_step("source", source)
    wf.map("each", each, over="source")
    wf.add_step("join", join, after=["each"])
    return wf


class Counting:
    """Counts every statement an engine's connections send (see the module)."""

    _original = Statement.first

    def __init__(self, engine: Any) -> None:
        self.by_kind: Counter[str] = Counter()
        event.listen(engine, "before_cursor_execute", self._sqlalchemy)
        original = Counting._original
        counting = self

        def first(self: Statement, conn: Any, params: dict[str, Any]) -> Any:
            counting.by_kind["hot path (claim, complete)"] += 1
            return original(self, conn, params)

        Statement.first = first  # type: ignore[method-assign]

    @classmethod
    def restore(cls) -> None:
        """Stop counting the hot path's statements (the wrapper is process-wide)."""
        Statement.first = cls._original  # type: ignore[method-assign]

    def _sqlalchemy(self, conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        self.by_kind["through SQLAlchemy"] += 1

    @property
    def total(self) -> int:
        return sum(self.by_kind.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000,10000")
    args = parser.parse_args()
    recreate_database(DB_NAME, URL)
    engine = create_engine(URL, pool_size=5, max_overflow=5)
    saga = Saga(Registry(workflow()), engine=engine, settings=Settings())
    counting = Counting(engine)
    print(f"{'items':>7} {'statements':>11} {'per item':>9} {'hot path':>9} {'seconds':>8}")
    for n in (int(s) for s in args.sizes.split(",")):
        run = saga.start_now("bench.map", {"n": n})
        counting.by_kind.clear()
        began = time.monotonic()
        drain(saga, timeout=3600)
        seconds = time.monotonic() - began
        total = counting.total
        got = saga.get_run(run.run_id)
        assert got["state"] == "completed" and got["result"] == {"join": n}, got["state"]
        hot = counting.by_kind["hot path (claim, complete)"]
        print(f"{n:>7} {total:>11} {total / n:>9.2f} {hot:>9} {seconds:>8.1f}", flush=True)
    engine.dispose()


if __name__ == "__main__":
    main()
