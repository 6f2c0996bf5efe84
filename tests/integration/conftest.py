"""Fixtures for driving the engine in-process against a real database."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import create_engine

from saga import Registry, RetryPolicy, Saga, Settings, Workflow

NO_WAIT = RetryPolicy(max_attempts=3, initial_delay=0.01, max_delay=0.05, jitter=0)


def _noop(ctx: object) -> dict[str, str]:
    return {"ok": "yes"}


def make_linear() -> Workflow:
    """a → b → c."""
    wf = Workflow("it.linear", retry=NO_WAIT)
    wf.add_step("a", lambda ctx: 1)
    wf.add_step("b", lambda ctx: ctx.results["a"] + 1, after=["a"])
    wf.add_step("c", lambda ctx: ctx.results["b"] + 1, after=["b"])
    return wf


def make_diamond() -> Workflow:
    """a → (b, c) → d."""
    wf = Workflow("it.diamond", retry=NO_WAIT)
    wf.add_step("a", lambda ctx: "a")
    wf.add_step("b", lambda ctx: ctx.results["a"] + "b", after=["a"])
    wf.add_step("c", lambda ctx: ctx.results["a"] + "c", after=["a"])
    wf.add_step("d", lambda ctx: ctx.results["b"] + ctx.results["c"], after=["b", "c"])
    return wf


def make_fan_in(width: int) -> Workflow:
    """``width`` independent branches joined by ``join``."""
    wf = Workflow(f"it.fan{width}", retry=NO_WAIT)
    for i in range(width):
        wf.add_step(f"b{i:02d}", _noop)
    wf.add_step("join", _noop, after=[f"b{i:02d}" for i in range(width)])
    return wf


@pytest.fixture
def registry() -> Registry:
    """Registry with the integration workflows."""
    return Registry(make_linear(), make_diamond(), make_fan_in(50))


@pytest.fixture
def saga_engine(db_url: str, registry: Registry) -> Iterator[Saga]:
    """An engine on a fresh migrated database."""
    engine = create_engine(db_url, pool_size=10, max_overflow=60)
    try:
        yield Saga(registry, engine=engine, settings=Settings(max_input_bytes=1024))
    finally:
        engine.dispose()
