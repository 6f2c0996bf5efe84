"""A Celery canvas (chain, group, chord of task signatures) as a saga workflow.

:func:`from_canvas` reads a canvas in Celery's own dictionary form (a ``Signature`` is a
``dict``), so this module imports no Celery. The canvas's **shape** becomes the workflow: one
:class:`~saga.steps.CeleryTaskStep` per task signature, named after its task, running after
what Celery would run it after. Its **arguments** become one run's input, with how each task
gets its predecessors' results, the way Celery passes them:

- in a chain, a task gets the previous task's result as its first argument, unless its
  signature is immutable (``.si()``);
- every task at the start of a group's members gets what the group was given;
- a chord's body (also a group followed by a task in a chain) gets the list of the group
  members' results, in the group's order.

So one workflow serves every run of a canvas built the same way with other arguments: the
workers register it (``registry.register(from_canvas(name, make_canvas(...)).workflow)``) and
:meth:`saga.Saga.start_canvas` starts a run of it from a concrete canvas. What saga cannot do
as Celery would is refused by name with :class:`~saga.errors.DefinitionError`: error callbacks
(``link_error``) and callbacks (``link``), ``chunks``/``map``/``starmap``, a group directly
inside a group (Celery would nest or flatten its results), and signature options other than
``queue``, ``priority`` and ``time_limit`` (e.g. ``countdown``, ``eta``, ``expires``). A task
that calls ``self.replace()`` fails its step for good when it runs (saga cannot follow the
replacement): declare the replacement's tasks in the canvas instead.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from saga.context import JSON, StepContext
from saga.definition import Workflow
from saga.errors import DefinitionError, UnknownWorkflowError
from saga.keys import KeyPolicy
from saga.registry import Registry
from saga.retry import DEFAULT_RETRY, RetryPolicy
from saga.steps import CeleryTaskStep

HONOURED_OPTIONS = frozenset({"queue", "priority", "time_limit"})
"""Signature options saga carries over (as the step's queue, priority and time limit)."""
_GROUP_TYPES = ("group",)
_CONTAINERS = ("chain", "group", "chord")


def canvas_args(ctx: StepContext) -> Sequence[Any]:
    """A canvas step's positional arguments: what its predecessors fed it, then its own."""
    call = ctx.input["canvas"][ctx.step]
    feed = call.get("feed")
    if feed is None:
        fed: list[Any] = []
    elif isinstance(feed, str):
        fed = [ctx.results[feed]]
    else:
        fed = [[ctx.results[s] for s in feed]]
    return [*fed, *call.get("args", [])]


def canvas_kwargs(ctx: StepContext) -> Mapping[str, Any]:
    """A canvas step's keyword arguments, as its signature gave them."""
    return dict(ctx.input["canvas"][ctx.step].get("kwargs", {}))


@dataclass(frozen=True)
class Canvas:
    """A Celery canvas converted: the ``workflow`` its shape is, and the ``input`` of a run with
    its arguments."""

    workflow: Workflow
    input: dict[str, JSON]


# What a node of the canvas hands on to the node after it: nothing (at the start), one step's
# result, or the list of a group's members' results in order.
_Feed = None | str | tuple[str, ...]


@dataclass
class _Builder:
    workflow: Workflow
    calls: dict[str, dict[str, Any]] = field(default_factory=dict)
    _counts: dict[str, int] = field(default_factory=dict)

    def fail(self, message: str, where: str | None = None) -> DefinitionError:
        return DefinitionError(self.workflow.name, message, (where,) if where else ())

    def node(self, sig: object, feed: _Feed, path: str) -> _Feed:
        if not isinstance(sig, Mapping) or not isinstance(sig.get("task"), str):
            raise self.fail(f"{path} is not a Celery signature: {type(sig).__name__}")
        kind = sig.get("subtask_type")
        if kind is None and sig["task"] in ("celery.chain", "celery.group", "celery.chord"):
            kind = sig["task"].partition(".")[2]
        if kind in _CONTAINERS:
            self._check_container(sig, str(kind), path)
        if kind == "chain":
            tasks = self._members(sig, "tasks", path)
            for i, member in enumerate(tasks):
                feed = self.node(member, feed, f"{path}.tasks[{i}]")
            return feed
        if kind == "group":
            return self._group(self._members(sig, "tasks", path), feed, path)
        if kind == "chord":
            header = sig["kwargs"].get("header")
            if isinstance(header, Mapping):
                if header.get("subtask_type") not in _GROUP_TYPES:
                    raise self.fail(f"{path}: a chord's header must be a group")
                self._check_container(header, "group", f"{path}.header")
                header = self._members(header, "tasks", f"{path}.header")
            if not isinstance(header, Sequence) or isinstance(header, str) or not header:
                raise self.fail(f"{path}: a chord needs a header of one task at least")
            fed = self._group(header, feed, f"{path}.header")
            body = sig["kwargs"].get("body")
            if body is None:
                raise self.fail(f"{path}: a chord needs a body")
            return self.node(body, fed, f"{path}.body")
        if kind is not None or sig["task"].startswith("celery."):
            raise self.fail(f"{path}: {kind or sig['task']} is not supported in a saga canvas")
        return self._task(sig, feed, path)

    def _group(self, members: Sequence[Any], feed: _Feed, path: str) -> _Feed:
        ends: list[str] = []
        for i, member in enumerate(members):
            end = self.node(member, feed, f"{path}[{i}]")
            if not isinstance(end, str):
                raise self.fail(
                    f"{path}[{i}]: a group directly inside a group is not supported "
                    "(Celery would nest its results); make it a chord or a chain ending in a task"
                )
            ends.append(end)
        return tuple(ends)

    def _members(self, sig: Mapping[str, Any], name: str, path: str) -> Sequence[Any]:
        members = sig.get("kwargs", {}).get(name)
        if not isinstance(members, Sequence) or isinstance(members, str) or not members:
            raise self.fail(f"{path}: an empty {sig.get('subtask_type') or 'canvas'}")
        return list(members)

    def _check_container(self, sig: Mapping[str, Any], kind: str, path: str) -> None:
        options = {k: v for k, v in (sig.get("options") or {}).items() if v not in (None, [], {})}
        if options:
            raise self.fail(
                f"{path}: options on a {kind} are not supported: {sorted(options)} "
                "(set them on its tasks)"
            )
        if sig.get("immutable"):
            raise self.fail(f"{path}: an immutable {kind} is not supported")
        extra = sig.get("kwargs", {}).get("kwargs")
        if kind == "chord" and extra:
            raise self.fail(f"{path}: chord keyword arguments are not supported")

    def _task(self, sig: Mapping[str, Any], feed: _Feed, path: str) -> str:
        task = str(sig["task"])
        n = self._counts[task] = self._counts.get(task, 0) + 1
        step = task if n == 1 else f"{task}-{n}"
        options = {k: v for k, v in (sig.get("options") or {}).items() if v not in (None, [], {})}
        for name in ("link_error", "link"):
            if name in options:
                raise self.fail(
                    f"{path}: {name} callbacks are not supported (saga runs what follows a "
                    "step, and compensates on failure)",
                    step,
                )
        refused = sorted(set(options) - HONOURED_OPTIONS)
        if refused:
            raise self.fail(
                f"{path}: signature option(s) {refused} cannot be honoured by saga "
                f"(supported: {sorted(HONOURED_OPTIONS)})",
                step,
            )
        args, kwargs = sig.get("args") or (), sig.get("kwargs") or {}
        if not isinstance(args, Sequence) or isinstance(args, str | bytes):
            raise self.fail(f"{path}: args must be a list", step)
        if not isinstance(kwargs, Mapping):
            raise self.fail(f"{path}: kwargs must be a mapping", step)
        after = () if feed is None else (feed,) if isinstance(feed, str) else feed
        self.workflow.add_step(
            step,
            CeleryTaskStep(task, args=canvas_args, kwargs=canvas_kwargs),
            after=after,
            queue=options.get("queue"),
            priority=options.get("priority"),
            time_limit=options.get("time_limit"),
        )
        given = None if sig.get("immutable") else feed
        self.calls[step] = {
            "args": list(args),
            "kwargs": dict(kwargs),
            "feed": list(given) if isinstance(given, tuple) else given,
        }
        return step


def from_canvas(
    name: str,
    canvas: Mapping[str, Any],
    *,
    version: int = 1,
    retry: RetryPolicy = DEFAULT_RETRY,
    queue: str = "saga",
    time_limit: float = 300.0,
    deadline: float | None = None,
    key_policy: KeyPolicy | str = KeyPolicy.RETURN_EXISTING,
) -> Canvas:
    """Convert a Celery canvas (a task signature, ``chain``, ``group`` or ``chord``) into a
    workflow named ``name`` and the input of one run of it. The workflow's options are the
    :class:`~saga.definition.Workflow`'s; a signature's ``queue``, ``priority`` and
    ``time_limit`` options become its step's. Raises :class:`DefinitionError` naming what is
    not supported."""
    workflow = Workflow(
        name, version=version, retry=retry, queue=queue, time_limit=time_limit,
        deadline=deadline, key_policy=key_policy,
    )
    builder = _Builder(workflow)
    builder.node(canvas, None, "canvas")
    return Canvas(workflow, {"canvas": builder.calls})


def as_registered(
    registry: Registry, name: str, canvas: Mapping[str, Any], version: int | None = None
) -> Canvas:
    """``canvas`` as a run of the workflow ``registry`` has under ``name`` (and ``version``,
    by default the newest): registered now if there is none. A :class:`DefinitionError` if the
    registered workflow has another shape, or other step options (the canvas changed: declare
    the new shape under a new version)."""
    try:
        existing = registry.get(name, version)
    except UnknownWorkflowError:
        converted = from_canvas(name, canvas, version=version or 1)
        registry.register(converted.workflow)
        return converted
    converted = from_canvas(name, canvas, version=existing.version)
    new = converted.workflow
    if existing.definition_hash != new.definition_hash:
        raise DefinitionError(
            name,
            f"the canvas's steps {_shape(new)} differ from those of registered version "
            f"{existing.version}, {_shape(existing)}; declare the new shape under a new version",
        )
    for step in new.step_names:
        ours, theirs = new[step], existing[step]
        for option in ("queue", "priority", "time_limit"):
            if getattr(ours, option) != getattr(theirs, option):
                raise DefinitionError(
                    name,
                    f"the canvas sets {option} {getattr(ours, option)!r}, the registered "
                    f"workflow {getattr(theirs, option)!r}",
                    (step,),
                )
    return Canvas(existing, converted.input)


def _shape(workflow: Workflow) -> dict[str, list[str]]:
    return {step: list(after) for step, after in workflow.after_map.items()}
