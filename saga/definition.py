"""Declaring workflows: a name, a version and a validated graph of named steps."""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from functools import cached_property
from typing import Any, Never, TypeVar

from saga.codec import check_storable
from saga.context import JSON, StepContext
from saga.core import graph
from saga.errors import DefinitionError, InputError
from saga.keys import KeyPolicy, key_policy
from saga.retry import DEFAULT_RETRY, RetryPolicy
from saga.steps import (
    CeleryTaskStep,
    FunctionStep,
    Sleep,
    StepRunner,
    TransactionalStep,
    WaitForSignal,
    WaitStep,
    is_transactional,
)
from saga.steps.children import ChildStep, UndoChild
from saga.steps.maps import MAX_MAP_NAME, MapStep, parse_instance
from saga.steps.waits import NO_DEFAULT


def _is_count(value: Any) -> bool:
    """Whether ``value`` is an int of at least 1 (``True`` is not one)."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,99}$")
F = TypeVar("F", bound=Callable[..., Any])
StepRef = str | Callable[..., Any]
"""A step named by its name or by the function declared as it."""
Runnable = StepRunner | Callable[[StepContext], JSON]


@dataclass(frozen=True)
class Step:
    """One node of a workflow's graph, as declared.

    ``queue``/``priority``/``time_limit`` of ``None`` fall back to the workflow's defaults;
    ``retry``/``compensation_retry`` of ``None`` to the workflow's retry policy.
    """

    name: str
    runner: StepRunner
    after: tuple[str, ...] = ()
    compensation: StepRunner | None = None
    retry: RetryPolicy | None = None
    compensation_retry: RetryPolicy | None = None
    queue: str | None = None
    priority: int | None = None
    time_limit: float | None = None


_WORKFLOW_OPTIONS = (
    "version", "retry", "queue", "time_limit", "deadline", "steps", "key_policy",
)
_STEP_OPTIONS = (
    "after", "compensate", "retry", "compensation_retry", "queue", "priority", "time_limit"
)


def _unknown_options(unknown: Mapping[str, object], known: Sequence[str]) -> str:
    return f"unknown option(s) {', '.join(sorted(unknown))}; the options are {', '.join(known)}"


def _as_runner(workflow: str, step: str, what: str, value: object) -> StepRunner:
    if isinstance(value, FunctionStep | CeleryTaskStep | TransactionalStep):
        return value
    if isinstance(value, StepRunner) and not callable(value):
        return value
    if callable(value):
        return TransactionalStep(value) if is_transactional(value) else FunctionStep(value)
    raise DefinitionError(workflow, f"{what} must be callable, got {type(value).__name__}", (step,))


@dataclass
class Workflow:
    """A named, versioned graph of steps, each with optional compensation.

    Declare steps with the :meth:`step` decorator (or :meth:`add_step` for Celery tasks);
    every declaration is validated at once and a wrong one raises :class:`DefinitionError`
    naming the step. Passing ``steps=[Step(...), ...]`` validates the whole graph, cycles
    included. Registering the workflow freezes it. ``key_policy`` says what a start under a
    business key that names a run already does (:class:`~saga.keys.KeyPolicy`).
    """

    name: str
    version: int = 1
    retry: RetryPolicy = DEFAULT_RETRY
    queue: str = "saga"
    time_limit: float = 300.0
    deadline: float | None = None
    steps: Sequence[Step] = ()
    key_policy: KeyPolicy | str = KeyPolicy.RETURN_EXISTING
    """What starting a run does when its business key names a run already (``KeyPolicy``)."""
    _steps: dict[str, Step] = field(init=False, repr=False)
    _by_fn: dict[int, str] = field(init=False, repr=False)
    _frozen: bool = field(init=False, default=False, repr=False)

    def __init__(
        self,
        name: str,
        version: int = 1,
        retry: RetryPolicy = DEFAULT_RETRY,
        queue: str = "saga",
        time_limit: float = 300.0,
        deadline: float | None = None,
        steps: Sequence[Step] = (),
        key_policy: KeyPolicy | str = KeyPolicy.RETURN_EXISTING,
        **unknown: Never,
    ) -> None:
        """Declare a workflow; an unknown keyword option is a :class:`DefinitionError`."""
        if unknown:
            raise DefinitionError(str(name), _unknown_options(unknown, _WORKFLOW_OPTIONS))
        self.name = name
        self.version = version
        self.retry = retry
        self.queue = queue
        self.time_limit = time_limit
        self.deadline = deadline
        self.steps = steps
        self.key_policy = key_policy
        self._frozen = False
        self.__post_init__()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise DefinitionError(str(self.name), "workflow name must match " + _NAME.pattern)
        if not _is_count(self.version):
            raise DefinitionError(self.name, f"version must be an int >= 1, got {self.version!r}")
        if not isinstance(self.retry, RetryPolicy):
            raise DefinitionError(self.name, "retry must be a RetryPolicy")
        self._check_limit("time_limit", self.time_limit, None)
        try:
            self.key_policy = key_policy(self.key_policy)
        except ValueError as exc:
            raise DefinitionError(self.name, str(exc)) from None
        if self.deadline is not None:
            self._check_limit("deadline", self.deadline, None)
        self._steps = {}
        self._by_fn = {}
        declared = list(self.steps)
        for s in declared:
            if not isinstance(s, Step):
                raise DefinitionError(self.name, f"steps must be Step values, got {s!r}")
            self._check_step(s, known=None)
            if s.name in self._steps:
                raise DefinitionError(self.name, "duplicate step name", (s.name,))
            self._steps[s.name] = s
        for s in declared:
            unknown = [d for d in s.after if d not in self._steps]
            if unknown:
                raise DefinitionError(self.name, f"runs after unknown step(s) {unknown}", (s.name,))
        cycle = graph.find_cycle(self.after_map)
        if cycle:
            raise DefinitionError(self.name, "cycle: " + " -> ".join(cycle), cycle)

    # -- declaring ---------------------------------------------------------------------------

    def step(
        self,
        name: str | None = None,
        *,
        after: Iterable[StepRef] = (),
        compensate: Runnable | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        queue: str | None = None,
        priority: int | None = None,
        time_limit: float | None = None,
        **unknown: Never,
    ) -> Callable[[F], F]:
        """Declare the decorated function ``fn(ctx) -> JSON`` as a step; returns it unchanged."""
        if unknown and name is not None:
            raise DefinitionError(self.name, _unknown_options(unknown, _STEP_OPTIONS), (name,))

        def decorate(fn: F) -> F:
            step_name: str = name or str(getattr(fn, "__name__", ""))
            if unknown:
                raise DefinitionError(
                    self.name, _unknown_options(unknown, _STEP_OPTIONS), (step_name,)
                )
            self.add_step(
                step_name,
                fn,
                after=after,
                compensate=compensate,
                retry=retry,
                compensation_retry=compensation_retry,
                queue=queue,
                priority=priority,
                time_limit=time_limit,
            )
            self._by_fn[id(fn)] = step_name
            return fn

        return decorate

    def add_step(
        self,
        name: str,
        run: Runnable,
        *,
        after: Iterable[StepRef] = (),
        compensate: Runnable | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        queue: str | None = None,
        priority: int | None = None,
        time_limit: float | None = None,
        **unknown: Never,
    ) -> Step:
        """Declare a step run by ``run``: a function of the context or a step kind such as
        :class:`~saga.steps.CeleryTaskStep`. A step is declared after the steps it runs after
        (those named in ``after`` must be declared already), so a graph declared this way
        cannot have a cycle."""
        if unknown:
            raise DefinitionError(self.name, _unknown_options(unknown, _STEP_OPTIONS), (str(name),))
        if isinstance(after, str | bytes) or callable(after):
            raise DefinitionError(self.name, "after must be a list of steps", (str(name),))
        after = list(after)
        if any(isinstance(ref, str) and ref == name for ref in after):
            raise DefinitionError(self.name, "runs after itself", (str(name),))
        deps = tuple(self._resolve(name, ref) for ref in after)
        new = Step(
            name=name,
            runner=_as_runner(self.name, str(name), "the step's code", run),
            after=deps,
            compensation=(
                None
                if compensate is None
                else _as_runner(self.name, str(name), "compensate", compensate)
            ),
            retry=retry,
            compensation_retry=compensation_retry,
            queue=queue,
            priority=priority,
            time_limit=time_limit,
        )
        self._check_step(new, known=self._steps)
        self._steps[name] = new
        self._changed()
        return new

    def compensation(self, step: StepRef) -> Callable[[F], F]:
        """Declare the decorated function as the compensation of an already declared step."""

        def decorate(fn: F) -> F:
            if isinstance(step, str) and step not in self._steps:
                raise DefinitionError(self.name, "compensation for a missing step", (step,))
            target = self._resolve("<compensation>", step)
            current = self._steps[target]
            if isinstance(current.runner, ChildStep):
                raise DefinitionError(
                    self.name, "a child step is undone by its child's compensations", (target,)
                )
            if current.compensation is not None:
                raise DefinitionError(self.name, "already has a compensation", (target,))
            if isinstance(current.runner, WaitStep):
                raise DefinitionError(
                    self.name, "a wait has nothing to undo: no compensation", (target,)
                )
            runner = _as_runner(self.name, target, "compensate", fn)
            self._assert_open(target)
            if isinstance(current.runner, MapStep):  # it undoes one instance at a time
                if current.runner.compensation is not None:
                    raise DefinitionError(self.name, "already has a compensation", (target,))
                mapped = replace(current.runner, compensation=runner)
                self._steps[target] = replace(current, runner=mapped)
            else:
                self._steps[target] = Step(**{**current.__dict__, "compensation": runner})
            self._changed()
            return fn

        return decorate

    def sleep(
        self,
        name: str,
        *,
        for_: timedelta | float | None = None,
        until: Callable[[StepContext], datetime] | None = None,
        after: Iterable[StepRef] = (),
    ) -> Step:
        """Declare a durable sleep: for a duration (``for_``, a ``timedelta`` or seconds) from
        when it starts, or ``until`` a time computed from the context (an aware ``datetime``
        from the input or an earlier result). No worker is held while it sleeps; the relay
        wakes it within about a second of its time, across restarts of everything."""
        if (for_ is None) == (until is None):
            raise DefinitionError(self.name, "a sleep needs exactly one of for_ or until",
                                  (str(name),))
        seconds = None if for_ is None else _seconds(self.name, str(name), "for_", for_)
        return self.add_step(name, Sleep(seconds=seconds, until=until), after=after)

    def wait_for_signal(
        self,
        name: str,
        *,
        signal: str,
        timeout: timedelta | float,
        default: JSON = NO_DEFAULT,
        after: Iterable[StepRef] = (),
        retry: RetryPolicy | None = None,
    ) -> Step:
        """Declare a step that waits for the run's signal ``signal`` (:meth:`saga.Saga.signal`;
        one sent before the wait began counts) and returns its payload. Past ``timeout`` the
        attempt fails (retried under ``retry``, then the run compensates) or, with a
        ``default``, the step completes with that value. No worker is held while it waits."""
        seconds = _seconds(self.name, str(name), "timeout", timeout)
        return self.add_step(
            name, WaitForSignal(signal=signal, timeout=seconds, default=default), after=after,
            retry=retry,
        )

    def map(
        self,
        name: str,
        fn: Runnable,
        *,
        over: StepRef,
        after: Iterable[StepRef] = (),
        max_parallel: int | None = None,
        compensate: Runnable | None = None,
        retry: RetryPolicy | None = None,
        compensation_retry: RetryPolicy | None = None,
        queue: str | None = None,
        priority: int | None = None,
        time_limit: float | None = None,
    ) -> Step:
        """Declare a map: one instance of ``fn`` per item of step ``over``'s result (a JSON
        list, at most :data:`~saga.steps.maps.MAX_MAP_ITEMS` items), each a step of its own
        (``name[00042]``: attempts under ``retry``, ``time_limit``, idempotency key, and
        ``compensate`` undoing it, called with ``ctx.item``); ``fn`` gets ``ctx.item`` and
        ``ctx.index``. With ``max_parallel`` K, instance i starts when instance i-K has
        completed. The steps after the map receive the instances' results as a list in item
        order (``ctx.results[name]``); the map itself runs after ``over`` and ``after``."""
        where = (str(name),)
        if not isinstance(name, str) or len(name) > MAX_MAP_NAME:
            raise DefinitionError(
                self.name, f"a map's name has at most {MAX_MAP_NAME} characters", where
            )
        if max_parallel is not None and not _is_count(max_parallel):
            raise DefinitionError(
                self.name, f"max_parallel must be an int >= 1, got {max_parallel!r}", where
            )
        if isinstance(after, str | bytes) or callable(after):
            raise DefinitionError(self.name, "after must be a list of steps", where)
        source = self._resolve(name, over)
        runner = _as_runner(self.name, name, "the map's code", fn)
        if isinstance(runner, WaitStep | MapStep):
            raise DefinitionError(self.name, "a map's instances run code: not a wait or a map",
                                  where)
        undo = None if compensate is None else _as_runner(self.name, name, "compensate",
                                                          compensate)
        deps = [source, *(d for d in (self._resolve(name, a) for a in after) if d != source)]
        mapped = MapStep(over=source, fn=runner, compensation=undo, max_parallel=max_parallel)
        return self.add_step(
            name, mapped, after=deps, retry=retry, compensation_retry=compensation_retry,
            queue=queue, priority=priority, time_limit=time_limit,
        )

    def child(
        self,
        name: str,
        *,
        workflow: Workflow | str,
        input: Callable[[StepContext], JSON] | None = None,
        after: Iterable[StepRef] = (),
        version: int | None = None,
        retry: RetryPolicy | None = None,
        queue: str | None = None,
    ) -> Step:
        """Declare a step that runs ``workflow`` (a :class:`Workflow`, registered with this
        one, or the name of a registered one, checked when the step starts) as a child run,
        with ``input(ctx)`` as its input (without one, this run's input), and completes with
        the child's result. A child that fails, is compensated or is cancelled fails the step
        (retried under ``retry`` with a new child, then this run compensates). Undoing the
        step compensates a completed child, or cancels a live one, and waits for it; no
        worker is held while the child runs. ``version`` pins the child's version (default:
        the newest registered when the step starts)."""
        where = (str(name),)
        definition = workflow if isinstance(workflow, Workflow) else None
        child_name = workflow.name if isinstance(workflow, Workflow) else workflow
        if not isinstance(child_name, str) or not _NAME.match(child_name):
            raise DefinitionError(
                self.name, f"workflow must be a Workflow or a workflow name, got {workflow!r}",
                where,
            )
        if input is not None and not callable(input):
            raise DefinitionError(self.name, "input must be a function of the context", where)
        if version is not None and not _is_count(version):
            raise DefinitionError(self.name, f"version must be an int >= 1, got {version!r}",
                                  where)
        if definition is not None and version is not None and definition.version != version:
            raise DefinitionError(
                self.name, f"version {version} differs from the workflow given "
                f"({child_name!r} v{definition.version})", where,
            )
        runner = ChildStep(workflow=child_name, version=version, input=input,
                           definition=definition)
        return self.add_step(name, runner, after=after, compensate=UndoChild(), retry=retry,
                             queue=queue)

    @property
    def child_steps(self) -> tuple[str, ...]:
        """The names of the steps that run a child workflow."""
        return tuple(n for n, s in self._steps.items() if isinstance(s.runner, ChildStep))

    @property
    def children(self) -> list[Workflow]:
        """The workflows given (as objects) to this one's child steps, registered with it."""
        found = [s.runner.definition for s in self._steps.values()
                 if isinstance(s.runner, ChildStep)]
        return [d for d in found if isinstance(d, Workflow)]

    # -- reading -----------------------------------------------------------------------------

    @property
    def after_map(self) -> dict[str, tuple[str, ...]]:
        """Each step's name mapped to the names it runs after."""
        return {name: s.after for name, s in self._steps.items()}

    def __getitem__(self, name: str) -> Step:
        """The step ``name``; for an instance of a map (``label[00042]``), a step of its own
        that runs the map's code, with the map's policies and the compensation of one item."""
        found = self._steps.get(name)
        if found is not None:
            return found
        parsed = parse_instance(name)
        mapped = None if parsed is None else self._steps.get(parsed[0])
        if mapped is None or not isinstance(mapped.runner, MapStep):
            raise KeyError(name)
        return replace(mapped, name=name, runner=mapped.runner.fn, after=(),
                       compensation=mapped.runner.compensation)

    def __contains__(self, name: object) -> bool:
        if name in self._steps:
            return True
        return isinstance(name, str) and self.map_of(name) is not None

    def map_of(self, step: str) -> tuple[str, int] | None:
        """``(map, index)`` if ``step`` names an instance of one of this workflow's maps."""
        parsed = parse_instance(step)
        mapped = None if parsed is None else self._steps.get(parsed[0])
        if mapped is None or not isinstance(mapped.runner, MapStep):
            return None
        return parsed

    @cached_property
    def maps(self) -> dict[str, MapStep]:
        """The workflow's maps by name."""
        return {n: s.runner for n, s in self._steps.items() if isinstance(s.runner, MapStep)}

    @property
    def roots(self) -> tuple[str, ...]:
        """The steps that depend on nothing: ready as soon as a run starts."""
        return graph.roots(self.after_map)

    @property
    def step_names(self) -> tuple[str, ...]:
        """Step names in declaration order."""
        return tuple(self._steps)

    @cached_property
    def definition_hash(self) -> str:
        """A hash of the graph that pins a run: its steps, their dependencies, which have a
        compensation, each step's kind, and a map's ``max_parallel``. Policies (retries, time
        limits, queues, priorities) and the code's names are not in it: they may change under
        running runs and apply from the next attempt, while a changed graph needs a new
        ``version``."""
        doc = {
            "name": self.name,
            "version": self.version,
            "steps": [
                {
                    "name": s.name,
                    "after": sorted(s.after),
                    "kind": s.runner.identity.partition(":")[0],
                    "compensated": s.compensation is not None
                    or (isinstance(s.runner, MapStep) and s.runner.compensation is not None),
                    # A map's lanes shape its instances' graph (which one releases which).
                    **({"lanes": s.runner.max_parallel} if isinstance(s.runner, MapStep) else {}),
                }
                for s in self._steps.values()
            ],
        }
        raw = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(raw).hexdigest()[:16]

    def route(self, step: str) -> dict[str, Any]:
        """Where a step's (and its compensation's) messages go: its name, queue, priority and
        time limit, as the outbox stores them."""
        return {
            "step": step,
            "queue": self.queue_for(step),
            "priority": self[step].priority,
            "time_limit": self.time_limit_for(step),
        }

    def retry_for(self, step: str, kind: str) -> RetryPolicy:
        """The retry policy of a step (``kind='step'``) or of its compensation."""
        s = self[step]
        policy = s.compensation_retry if kind == "compensation" else s.retry
        return policy or self.retry

    def queue_for(self, step: str) -> str:
        """The queue the step's (and its compensation's) messages go to."""
        return self[step].queue or self.queue

    def time_limit_for(self, step: str) -> float:
        """The step's time limit in seconds."""
        return self[step].time_limit or self.time_limit

    def freeze(self) -> None:
        """Refuse further declarations (done on registration); checks the graph is not empty."""
        if not self._steps:
            raise DefinitionError(self.name, "a workflow needs at least one step")
        self._frozen = True

    # -- helpers -----------------------------------------------------------------------------

    def _resolve(self, name: object, ref: StepRef) -> str:
        if isinstance(ref, str):
            if ref not in self._steps:
                raise DefinitionError(
                    self.name,
                    f"runs after unknown step {ref!r} (a step must be declared after the "
                    "steps it runs after)",
                    (str(name), ref),
                )
            return ref
        found = self._by_fn.get(id(ref))
        if found is None:
            label = getattr(ref, "__name__", repr(ref))
            raise DefinitionError(
                self.name,
                f"refers to {label!r}, which is not a step of this workflow",
                (str(name),),
            )
        return found

    def _changed(self) -> None:
        for cached in ("definition_hash", "maps"):
            self.__dict__.pop(cached, None)

    def _assert_open(self, step: str) -> None:
        if self._frozen:
            raise DefinitionError(
                self.name, "the workflow is registered and frozen; declare steps before", (step,)
            )

    def _check_limit(self, what: str, value: object, step: str | None) -> None:
        if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
            where = (step,) if step else ()
            raise DefinitionError(self.name, f"{what} must be a number > 0, got {value!r}", where)

    def _check_step(self, s: Step, known: Mapping[str, Step] | None) -> None:
        name = s.name
        if not isinstance(name, str) or not _NAME.match(name):
            raise DefinitionError(self.name, "step name must match " + _NAME.pattern, (str(name),))
        self._assert_open(name)
        if known is not None and name in known:
            raise DefinitionError(self.name, "duplicate step name", (name,))
        if len(set(s.after)) != len(s.after):
            raise DefinitionError(self.name, "lists a dependency twice", (name,))
        if name in s.after:
            raise DefinitionError(self.name, "runs after itself", (name,))
        for what, value in (("retry", s.retry), ("compensation_retry", s.compensation_retry)):
            if value is not None and not isinstance(value, RetryPolicy):
                raise DefinitionError(self.name, f"{what} must be a RetryPolicy", (name,))
        if s.queue is not None and (not isinstance(s.queue, str) or not _NAME.match(s.queue)):
            raise DefinitionError(self.name, f"bad queue name {s.queue!r}", (name,))
        if s.priority is not None and (
            isinstance(s.priority, bool)
            or not isinstance(s.priority, int)
            or not 0 <= s.priority <= 9
        ):
            raise DefinitionError(self.name, "priority must be an int from 0 to 9", (name,))
        if s.time_limit is not None:
            self._check_limit("time_limit", s.time_limit, name)
        if isinstance(s.runner, WaitStep):
            self._check_wait(s.runner, s)
        if isinstance(s.runner, ChildStep) != isinstance(s.compensation, UndoChild):
            raise DefinitionError(
                self.name, "a child step is undone by its child's compensations (declare it "
                "with wf.child)", (name,),
            )

    def _check_wait(self, runner: WaitStep, s: Step) -> None:
        where = (s.name,)
        if s.compensation is not None:
            raise DefinitionError(self.name, "a wait has nothing to undo: no compensation", where)
        if isinstance(runner, Sleep):
            if (runner.seconds is None) == (runner.until is None):
                raise DefinitionError(self.name, "a sleep needs exactly one of for_ or until",
                                      where)
            if runner.seconds is not None:
                _seconds(self.name, s.name, "for_", runner.seconds)
            if runner.until is not None and not callable(runner.until):
                raise DefinitionError(self.name, "until must be a function of the context",
                                      where)
        if isinstance(runner, WaitForSignal):
            if not isinstance(runner.signal, str) or not _NAME.match(runner.signal):
                raise DefinitionError(
                    self.name, f"signal name {runner.signal!r} must match {_NAME.pattern}", where
                )
            _seconds(self.name, s.name, "timeout", runner.timeout)
            if runner.has_default:
                try:
                    check_storable(runner.default, workflow=self.name, field="default")
                except InputError as exc:
                    raise DefinitionError(
                        self.name, f"default is not storable JSON: {exc}", where
                    ) from None


def _seconds(workflow: str, step: str, what: str, value: object) -> float:
    """A duration given as a ``timedelta`` or a number of seconds, in seconds (> 0, finite)."""
    seconds = value.total_seconds() if isinstance(value, timedelta) else value
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, int | float)
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise DefinitionError(
            workflow, f"{what} must be a timedelta or seconds > 0, got {value!r}", (step,)
        )
    return float(seconds)
