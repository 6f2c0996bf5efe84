"""Declaring workflows: every wrong declaration is refused at once, naming the step."""

from __future__ import annotations

from typing import Any

import pytest

from saga.definition import Step, Workflow
from saga.errors import DefinitionError, UnknownWorkflowError
from saga.registry import Registry
from saga.retry import RetryPolicy
from saga.steps import CeleryTaskStep, FunctionStep


def reserve(ctx: Any) -> dict[str, str]:
    return {"reserved": "yes"}


def charge(ctx: Any) -> dict[str, str]:
    return {"charged": "yes"}


def ship(ctx: Any) -> dict[str, str]:
    return {"shipped": "yes"}


def refund(ctx: Any) -> None:
    return None


def release(ctx: Any) -> None:
    return None


def order_workflow(*, ship_after: tuple[str, ...] = ("charge",), ship_fn: Any = ship) -> Workflow:
    wf = Workflow("order")
    wf.add_step("reserve", reserve, compensate=release)
    wf.add_step("charge", charge, after=["reserve"], compensate=refund)
    wf.add_step("ship", ship_fn, after=ship_after)
    return wf


def test_a_declared_graph_keeps_its_steps_and_edges_in_declaration_order() -> None:
    wf = order_workflow()

    assert wf.step_names == ("reserve", "charge", "ship")
    assert wf.after_map == {"reserve": (), "charge": ("reserve",), "ship": ("charge",)}
    assert "charge" in wf
    assert "missing" not in wf
    assert isinstance(wf["charge"].runner, FunctionStep)
    assert wf["charge"].compensation == FunctionStep(refund)
    assert wf["ship"].compensation is None


def test_the_step_decorator_returns_the_function_and_resolves_after_by_function() -> None:
    wf = Workflow("decorated")

    @wf.step()
    def first(ctx: Any) -> int:
        return 1

    @wf.step("second", after=[first])
    def second_fn(ctx: Any) -> int:
        return 2

    assert first(None) == 1
    assert wf.step_names == ("first", "second")
    assert wf["second"].after == ("first",)


def test_a_cycle_is_refused_naming_its_steps() -> None:
    steps = [
        Step("a", FunctionStep(reserve), after=("c",)),
        Step("b", FunctionStep(charge), after=("a",)),
        Step("c", FunctionStep(ship), after=("b",)),
    ]

    with pytest.raises(DefinitionError, match="cycle") as info:
        Workflow("loop", steps=steps)

    assert info.value.workflow == "loop"
    assert set(info.value.steps) == {"a", "b", "c"}
    assert info.value.steps[0] == info.value.steps[-1]
    assert str(info.value) == "workflow 'loop' (step 'a', 'c', 'b', 'a'): cycle: a -> c -> b -> a"


def test_a_step_that_runs_after_itself_is_refused() -> None:
    with pytest.raises(DefinitionError, match="runs after itself") as info:
        Workflow("selfish", steps=[Step("a", FunctionStep(reserve), after=("a",))])

    assert info.value.steps == ("a",)


def test_a_step_declared_to_run_after_itself_is_refused_as_such() -> None:
    wf = Workflow("selfish")

    with pytest.raises(DefinitionError, match="runs after itself") as by_call:
        wf.add_step("a", reserve, after=["a"])
    with pytest.raises(DefinitionError, match="runs after itself") as by_decorator:

        @wf.step(after=["charge"])
        def charge(ctx: Any) -> None: ...

    assert by_call.value.steps == ("a",)
    assert by_decorator.value.steps == ("charge",)
    assert "unknown" not in str(by_call.value) + str(by_decorator.value)


def test_running_after_a_step_not_declared_yet_says_steps_come_after_their_dependencies() -> None:
    wf = Workflow("w")

    # What declaring a -> b -> a looks like with the decorator: the first declaration fails.
    with pytest.raises(DefinitionError) as info:

        @wf.step(after=["b"])
        def a(ctx: Any) -> None: ...

    message = str(info.value)
    assert "runs after unknown step 'b'" in message
    assert "a step must be declared after the steps it runs after" in message
    assert info.value.steps == ("a", "b")


@pytest.mark.parametrize(
    "declare",
    [
        lambda: Workflow("w", retries=3),
        lambda: Workflow("w").add_step("a", reserve, retries=3),
        lambda: Workflow("w").step("a", retries=3),
        lambda: Workflow("w").step(retries=3)(reserve),
    ],
    ids=["workflow", "add_step", "step_named", "step_decorator"],
)
def test_an_unknown_option_is_a_definition_error_naming_it(declare: Any) -> None:
    with pytest.raises(DefinitionError, match="unknown option") as info:
        declare()

    assert "retries" in str(info.value)
    assert info.value.workflow == "w"
    assert isinstance(info.value, TypeError) and isinstance(info.value, ValueError)


def test_an_unknown_option_of_a_step_names_the_step() -> None:
    with pytest.raises(DefinitionError) as info:
        Workflow("w").step(retries=3)(reserve)

    assert info.value.steps == ("reserve",)


def test_an_acyclic_graph_given_as_steps_is_accepted() -> None:
    wf = Workflow(
        "diamond",
        steps=[
            Step("a", FunctionStep(reserve)),
            Step("b", FunctionStep(charge), after=("a",)),
            Step("c", FunctionStep(ship), after=("a",)),
            Step("d", FunctionStep(refund), after=("b", "c")),
        ],
    )

    assert wf.after_map["d"] == ("b", "c")


def test_running_after_an_unknown_step_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("a", reserve)

    with pytest.raises(DefinitionError, match="unknown step 'nope'") as info:
        wf.add_step("b", charge, after=["nope"])

    assert info.value.steps == ("b", "nope")
    assert "b" not in wf


def test_an_unknown_after_in_declared_steps_is_refused() -> None:
    with pytest.raises(DefinitionError, match="unknown") as info:
        Workflow("w", steps=[Step("b", FunctionStep(charge), after=("ghost",))])

    assert info.value.steps == ("b",)


def test_after_given_as_a_single_string_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("a", reserve)

    with pytest.raises(DefinitionError, match="list of steps"):
        wf.add_step("b", charge, after="a")


def test_a_duplicate_step_name_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("a", reserve)

    with pytest.raises(DefinitionError, match="duplicate step name") as info:
        wf.add_step("a", charge)

    assert info.value.steps == ("a",)
    assert wf["a"].runner == FunctionStep(reserve)


def test_a_duplicate_step_name_in_declared_steps_is_refused() -> None:
    with pytest.raises(DefinitionError, match="duplicate step name"):
        Workflow("w", steps=[Step("a", FunctionStep(reserve)), Step("a", FunctionStep(charge))])


def test_a_compensation_for_a_missing_step_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("a", reserve)

    with pytest.raises(DefinitionError, match="compensation for a missing step") as info:
        wf.compensation("missing")(refund)

    assert info.value.steps == ("missing",)


def test_a_compensation_is_attached_to_its_step_once() -> None:
    wf = Workflow("w")
    wf.add_step("a", reserve)

    returned = wf.compensation("a")(refund)

    assert returned is refund
    assert wf["a"].compensation == FunctionStep(refund)
    with pytest.raises(DefinitionError, match="already has a compensation"):
        wf.compensation("a")(release)


def test_non_callable_step_code_is_refused() -> None:
    wf = Workflow("w")

    with pytest.raises(DefinitionError, match="must be callable, got int") as info:
        wf.add_step("a", 42)  # type: ignore[arg-type]

    assert info.value.steps == ("a",)


def test_a_non_callable_compensation_is_refused() -> None:
    wf = Workflow("w")

    with pytest.raises(DefinitionError, match="compensate must be callable"):
        wf.add_step("a", reserve, compensate="refund")  # type: ignore[arg-type]


def test_a_celery_task_step_is_kept_as_it_is() -> None:
    wf = Workflow("w")
    task = CeleryTaskStep("billing.charge")

    wf.add_step("charge", task)

    assert wf["charge"].runner is task


@pytest.mark.parametrize("priority", [-1, 10, 1.5, True, "5"])
def test_a_priority_outside_0_to_9_is_refused(priority: Any) -> None:
    wf = Workflow("w")

    with pytest.raises(DefinitionError, match="priority must be an int from 0 to 9"):
        wf.add_step("a", reserve, priority=priority)


@pytest.mark.parametrize("priority", [0, 9])
def test_priorities_at_the_bounds_are_accepted(priority: int) -> None:
    wf = Workflow("w")

    wf.add_step("a", reserve, priority=priority)

    assert wf["a"].priority == priority


@pytest.mark.parametrize("queue", ["", "has space", "x" * 101, 7])
def test_a_bad_queue_name_is_refused(queue: Any) -> None:
    wf = Workflow("w")

    with pytest.raises(DefinitionError, match="bad queue name"):
        wf.add_step("a", reserve, queue=queue)


@pytest.mark.parametrize("limit", [0, -1, True, "10"])
def test_a_bad_time_limit_is_refused(limit: Any) -> None:
    wf = Workflow("w")

    with pytest.raises(DefinitionError, match="time_limit must be a number > 0"):
        wf.add_step("a", reserve, time_limit=limit)


def test_step_settings_fall_back_to_the_workflow_defaults() -> None:
    default_retry = RetryPolicy(max_attempts=5)
    step_retry = RetryPolicy(max_attempts=2)
    wf = Workflow("w", retry=default_retry, queue="orders", time_limit=30.0)
    wf.add_step("a", reserve)
    wf.add_step("b", charge, queue="payments", time_limit=5.0, retry=step_retry)

    assert wf.queue_for("a") == "orders"
    assert wf.queue_for("b") == "payments"
    assert wf.time_limit_for("a") == 30.0
    assert wf.time_limit_for("b") == 5.0
    assert wf.retry_for("a", "step") is default_retry
    assert wf.retry_for("b", "step") is step_retry
    assert wf.retry_for("b", "compensation") is default_retry


@pytest.mark.parametrize(
    "kwargs",
    [
        {"name": "has space"},
        {"name": "w", "version": 0},
        {"name": "w", "version": True},
        {"name": "w", "retry": 3},
        {"name": "w", "time_limit": 0},
        {"name": "w", "deadline": -5},
    ],
)
def test_a_bad_workflow_setting_is_refused(kwargs: dict[str, Any]) -> None:
    with pytest.raises(DefinitionError):
        Workflow(**kwargs)


def test_a_registered_workflow_is_frozen() -> None:
    wf = order_workflow()
    Registry(wf)

    with pytest.raises(DefinitionError, match="frozen") as info:
        wf.add_step("late", ship, after=["ship"])
    assert info.value.steps == ("late",)
    with pytest.raises(DefinitionError, match="frozen"):
        wf.compensation("ship")(refund)
    assert wf.step_names == ("reserve", "charge", "ship")
    assert wf["ship"].compensation is None


def test_an_empty_workflow_cannot_be_registered() -> None:
    with pytest.raises(DefinitionError, match="at least one step"):
        Registry().register(Workflow("empty"))


def test_the_definition_hash_is_stable_across_identical_declarations() -> None:
    first = order_workflow().definition_hash
    second = order_workflow().definition_hash

    assert first == second
    assert len(first) == 16
    int(first, 16)


def test_the_definition_hash_changes_when_an_edge_changes() -> None:
    base = order_workflow().definition_hash

    assert order_workflow(ship_after=("reserve",)).definition_hash != base
    assert order_workflow(ship_after=("reserve", "charge")).definition_hash != base


def test_the_definition_hash_changes_when_a_step_is_added_but_not_when_its_code_is_renamed(
) -> None:
    base = order_workflow()
    before = base.definition_hash

    assert order_workflow(ship_fn=refund).definition_hash == before
    base.add_step("notify", release, after=["ship"])
    assert base.definition_hash != before


def test_the_definition_hash_changes_with_a_steps_kind() -> None:
    def declare(runner: Any) -> str:
        wf = Workflow("w")
        wf.add_step("a", runner)
        return wf.definition_hash

    assert declare(reserve) != declare(CeleryTaskStep("shop.reserve"))


def test_the_definition_hash_changes_when_a_compensation_is_added() -> None:
    wf = order_workflow()
    before = wf.definition_hash

    wf.compensation("ship")(refund)

    assert wf.definition_hash != before


def test_the_definition_hash_changes_with_the_version_but_not_with_policies() -> None:
    def declare(step_options: dict[str, Any] | None = None, **kwargs: Any) -> str:
        wf = Workflow("w", **kwargs)
        wf.add_step("a", reserve, **(step_options or {}))
        return wf.definition_hash

    base = declare()
    assert declare() == base
    assert declare(version=2) != base
    # A deploy may change these under running runs: they apply from the next attempt.
    assert declare(retry=RetryPolicy(max_attempts=7)) == base
    assert declare(queue="other", time_limit=5, deadline=60) == base
    assert declare({"retry": RetryPolicy(max_attempts=9), "priority": 3, "queue": "q"}) == base


def test_the_registry_returns_a_version_or_the_latest() -> None:
    v1 = Workflow("order", version=1)
    v1.add_step("a", reserve)
    v2 = Workflow("order", version=2)
    v2.add_step("a", reserve)
    registry = Registry(v1, v2)

    assert registry.get("order") is v2
    assert registry.get("order", 1) is v1
    assert len(registry) == 2
    assert [wf.version for wf in registry] == [1, 2]


def test_the_registry_refuses_a_second_workflow_with_the_same_name_and_version() -> None:
    first = Workflow("order")
    first.add_step("a", reserve)
    other = Workflow("order")
    other.add_step("a", charge)
    registry = Registry(first)

    assert registry.register(first) is first
    with pytest.raises(DefinitionError, match="version 1 is already registered"):
        registry.register(other)
    assert registry.get("order") is first


def test_the_registry_raises_for_an_unknown_workflow_or_version() -> None:
    wf = Workflow("order")
    wf.add_step("a", reserve)
    registry = Registry(wf)

    with pytest.raises(UnknownWorkflowError, match="'missing'"):
        registry.get("missing")
    with pytest.raises(UnknownWorkflowError, match="version 3"):
        registry.get("order", 3)
