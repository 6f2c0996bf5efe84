"""An explicit registry of workflows: the engine, the relay and the workers each get one."""

from __future__ import annotations

from collections.abc import Iterator

from saga.definition import Workflow
from saga.errors import DefinitionError, ScheduleError, UnknownWorkflowError
from saga.schedules import Schedule


class Registry:
    """Workflows by (name, version). Several versions of one workflow may be registered at once,
    so runs started on an old version finish on it while new runs use the new one."""

    def __init__(self, *workflows: Workflow) -> None:
        self._by_key: dict[tuple[str, int], Workflow] = {}
        self._schedules: dict[str, Schedule] = {}
        for wf in workflows:
            self.register(wf)

    def register(self, workflow: Workflow) -> Workflow:
        """Add (and freeze) a workflow; a second one with the same name and version is an error."""
        key = (workflow.name, workflow.version)
        existing = self._by_key.get(key)
        if existing is workflow:
            return workflow
        if existing is not None:
            raise DefinitionError(
                workflow.name, f"version {workflow.version} is already registered"
            )
        workflow.freeze()
        self._by_key[key] = workflow
        for child in workflow.children:  # after this one: a child may name its parent
            self.register(child)
        return workflow

    def get(self, name: str, version: int | None = None) -> Workflow:
        """The workflow of that name at ``version``, or its latest version."""
        if version is not None:
            found = self._by_key.get((name, version))
            if found is None:
                raise UnknownWorkflowError(f"no workflow {name!r} version {version} is registered")
            return found
        versions = [v for (n, v) in self._by_key if n == name]
        if not versions:
            raise UnknownWorkflowError(f"no workflow {name!r} is registered")
        return self._by_key[(name, max(versions))]

    def add_schedule(self, schedule: Schedule) -> Schedule:
        """Add a :class:`~saga.schedules.Schedule`; the relays of this registry fire it. Its
        workflow is registered with it when it was given as an object, and must be registered
        already when given by name; a second schedule of the same name is an error."""
        if not isinstance(schedule, Schedule):
            raise ScheduleError(schedule, "add_schedule() takes a saga.Schedule")
        existing = self._schedules.get(schedule.name)
        if existing is schedule:
            return schedule
        if existing is not None:
            raise ScheduleError(schedule.name, "a schedule of that name is already registered")
        if schedule.definition is not None:
            self.register(schedule.definition)
        else:
            try:
                self.get(schedule.workflow)
            except UnknownWorkflowError as exc:
                raise ScheduleError(schedule.name, f"{exc} (register it first)") from None
        self._schedules[schedule.name] = schedule
        return schedule

    @property
    def schedules(self) -> list[Schedule]:
        """The registered schedules, by name."""
        return [self._schedules[n] for n in sorted(self._schedules)]

    def __iter__(self) -> Iterator[Workflow]:
        return iter(self._by_key.values())

    def __len__(self) -> int:
        return len(self._by_key)
