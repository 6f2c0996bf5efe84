"""Pure graph arithmetic over a workflow's steps (name -> names it runs after)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Set


def find_cycle(after: Mapping[str, Iterable[str]]) -> tuple[str, ...] | None:
    """A cycle in the graph as a tuple of step names, or ``None`` if it is acyclic."""
    white, grey, black = 0, 1, 2
    colour = dict.fromkeys(after, white)
    stack: list[str] = []

    def visit(node: str) -> tuple[str, ...] | None:
        colour[node] = grey
        stack.append(node)
        for dep in after.get(node, ()):
            if colour.get(dep) == grey:
                return (*stack[stack.index(dep) :], dep)
            if colour.get(dep) == white:
                found = visit(dep)
                if found:
                    return found
        stack.pop()
        colour[node] = black
        return None

    for node in after:
        if colour[node] == white:
            found = visit(node)
            if found:
                return found
    return None


def dependents(after: Mapping[str, Iterable[str]]) -> dict[str, tuple[str, ...]]:
    """For each step, the steps that run after it (declaration order)."""
    out: dict[str, list[str]] = {name: [] for name in after}
    for name, deps in after.items():
        for dep in deps:
            out[dep].append(name)
    return {name: tuple(v) for name, v in out.items()}


def roots(after: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """Steps with no dependency: ready as soon as a run starts."""
    return tuple(name for name, deps in after.items() if not tuple(deps))


def sinks(after: Mapping[str, Iterable[str]]) -> tuple[str, ...]:
    """Steps nothing runs after: their results make the run's result."""
    deps = dependents(after)
    return tuple(name for name in after if not deps[name])


def descendants(after: Mapping[str, Iterable[str]], step: str) -> set[str]:
    """Every step that runs (directly or transitively) after ``step``."""
    deps = dependents(after)
    seen: set[str] = set()
    todo = list(deps[step])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(deps[node])
    return seen


def ancestors(after: Mapping[str, Iterable[str]], step: str) -> set[str]:
    """Every step ``step`` runs (directly or transitively) after."""
    seen: set[str] = set()
    todo = list(after[step])
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            todo.extend(after[node])
    return seen


def compensation_plan(
    after: Mapping[str, Iterable[str]], to_undo: Set[str]
) -> dict[str, frozenset[str]]:
    """Which compensations each compensation waits for.

    ``to_undo`` are the completed steps that have a compensation. A step is compensated only
    after every step that depended on it (transitively) has been, so the compensation of ``s``
    waits for the compensations of the steps in ``to_undo`` that descend from ``s``.
    Independent branches wait for nothing of each other and may run in parallel.
    """
    return {s: frozenset(descendants(after, s) & to_undo) for s in to_undo}
