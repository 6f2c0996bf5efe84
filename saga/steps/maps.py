"""A map over a list: a step whose instances are made at run time, one per item of an earlier
step's result (see :meth:`saga.Workflow.map` and :mod:`saga.maps`).

The map's own step row is claimed like any step; instead of running code the worker expands
it: it inserts one step row per item, named :func:`instance_name` (``label[00042]``), with the
item on the row, and completes the map's row with ``{"items": N}``, all in one transaction.
Each instance then runs ``fn`` like any step (its own attempts, retries, time limit,
idempotency key ``run:step:label[00042]`` and compensation), with ``ctx.item`` and
``ctx.index``; the steps after the map wait for every instance and receive their results, in
item order, as the map's result.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from saga.context import JSON, StepContext
from saga.steps.base import StepRunner, TaskCaller

MAX_MAP_ITEMS = 100_000
"""The most items a map expands to; a longer list fails the map's step (not retried)."""

INDEX_DIGITS = 5
"""Digits of an instance's index in its name: ``label[00042]`` sorts in item order."""

MAX_MAP_NAME = 100 - INDEX_DIGITS - 2
"""The longest name a map may have: its instances' names fit the 100 characters of a step."""

_INSTANCE = re.compile(r"^(?P<map>.+)\[(?P<index>\d{" + str(INDEX_DIGITS) + r"})\]$")


def instance_name(map_step: str, index: int) -> str:
    """The step name of the instance of ``map_step`` for the item at ``index``."""
    return f"{map_step}[{index:0{INDEX_DIGITS}d}]"


def parse_instance(step: str) -> tuple[str, int] | None:
    """``(map, index)`` if ``step`` names an instance of a map, else ``None``."""
    found = _INSTANCE.match(step)
    return None if found is None else (found["map"], int(found["index"]))


@dataclass(frozen=True)
class MapStep:
    """Expands to one instance of ``fn`` per item of step ``over``'s result (a JSON list);
    ``compensation`` undoes one instance (it gets ``ctx.item`` and ``ctx.step_result``). With
    ``max_parallel`` K, instance i starts once instance i-K has completed: at most K instances
    run at a time."""

    over: str
    fn: StepRunner
    compensation: StepRunner | None = None
    max_parallel: int | None = None

    @property
    def identity(self) -> str:
        """``map:<over>:<the instances' code>``."""
        return f"map:{self.over}:{self.fn.identity}"

    def run(self, ctx: StepContext, tasks: TaskCaller | None) -> JSON:
        """Never called: the executor expands a map instead of running it."""
        raise RuntimeError(f"step {ctx.step!r} is a map; it is expanded, not run")
