"""Pure decisions of the slow path: what a stopping run does next. No I/O; the lifecycle module
loads a locked snapshot, asks here, and writes the answer."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set
from dataclasses import dataclass, field

from saga.core import graph
from saga.core.states import NOTHING_TO_UNDO_END, STOPPING


@dataclass(frozen=True)
class StopDecision:
    """What a stopping run does now.

    ``wait``: steps are still running; let them finish. Otherwise either ``end_state`` (nothing
    to undo) or ``compensations`` (each compensation's number of compensations to wait for)."""

    wait: bool = False
    end_state: str | None = None
    compensations: Mapping[str, int] = field(default_factory=dict)


def decide_stop(
    run_state: str,
    after: Mapping[str, Iterable[str]],
    with_compensation: Set[str],
    running: Set[str],
    started: Set[str],
) -> StopDecision:
    """Decide for a run in ``compensating``/``cancelling`` whose compensations have not begun.

    Every step that ``started`` (any attempt of it began running its code: it completed, failed,
    ran past its time limit or lost its worker) and has a compensation is undone: where the
    engine cannot know that an effect did not happen, it assumes it did. Steps still
    ``running`` are waited for first, so that nothing is undone while it may still be done."""
    if run_state not in STOPPING:
        raise ValueError(f"run in state {run_state!r} is not stopping")
    if running:
        return StopDecision(wait=True)
    to_undo = set(started) & set(with_compensation)
    if not to_undo:
        return StopDecision(end_state=NOTHING_TO_UNDO_END[run_state])
    plan = graph.compensation_plan({k: tuple(v) for k, v in after.items()}, to_undo)
    return StopDecision(compensations={s: len(w) for s, w in sorted(plan.items())})


def retry_plan(
    after: Mapping[str, Iterable[str]], completed: Set[str], restart: Set[str]
) -> dict[str, int]:
    """For an operator's retry: each not-completed step's count of not-completed dependencies
    (0: ready now). ``restart`` are completed steps to run again as well."""
    redo = {s for s in after if s not in completed} | set(restart)
    return {s: sum(1 for d in after[s] if d in redo) for s in sorted(redo)}
