"""Converting Celery canvases into workflows: the graph of their tasks, the input of a run with
their arguments, and what saga cannot honour refused by name."""

from __future__ import annotations

from typing import Any

import pytest
from celery import Celery, chain, chord, group

from saga import DefinitionError, Registry, from_canvas
from saga.canvas import as_registered, canvas_args, canvas_kwargs
from saga.context import StepContext

app = Celery("canvas-tests", broker="memory://")


def _task(name: str) -> Any:
    @app.task(name=name)  # type: ignore[untyped-decorator]
    def task(*args: Any, **kwargs: Any) -> Any:
        return None

    return task


reserve, charge, label, receipt, mark_fulfilled = (
    _task(f"seed.{n}") for n in ("reserve", "charge", "label", "receipt", "mark_fulfilled")
)


def harbor(order: int) -> Any:
    """The seed's canvas."""
    return chain(
        reserve.s(order), charge.s(), group(label.s(), receipt.s()), mark_fulfilled.si(order)
    )


def test_the_harbor_canvas_becomes_its_tasks_in_celerys_order() -> None:
    converted = from_canvas("seed.canvas", harbor(7))
    assert converted.workflow.after_map == {
        "seed.reserve": (),
        "seed.charge": ("seed.reserve",),
        "seed.label": ("seed.charge",),
        "seed.receipt": ("seed.charge",),
        "seed.mark_fulfilled": ("seed.label", "seed.receipt"),
    }
    assert converted.input == {
        "canvas": {
            "seed.reserve": {"args": [7], "kwargs": {}, "feed": None},
            "seed.charge": {"args": [], "kwargs": {}, "feed": "seed.reserve"},
            "seed.label": {"args": [], "kwargs": {}, "feed": "seed.charge"},
            "seed.receipt": {"args": [], "kwargs": {}, "feed": "seed.charge"},
            # Immutable: it runs after the group, and gets only its own arguments.
            "seed.mark_fulfilled": {"args": [7], "kwargs": {}, "feed": None},
        }
    }


def test_canvases_built_alike_with_other_arguments_are_one_workflow() -> None:
    assert (
        from_canvas("seed.canvas", harbor(1)).workflow.definition_hash
        == from_canvas("seed.canvas", harbor(2)).workflow.definition_hash
    )


def test_a_chord_body_gets_the_group_results_in_order_and_a_chain_the_previous_result() -> None:
    canvas = chain(
        reserve.s(1),
        chord([label.s(), chain(charge.s(), receipt.s(x=2))], mark_fulfilled.s(9)),
    )
    converted = from_canvas("c", canvas)
    calls = converted.input["canvas"]
    assert calls["seed.mark_fulfilled"]["feed"] == ["seed.label", "seed.receipt"]
    assert calls["seed.receipt"] == {"args": [], "kwargs": {"x": 2}, "feed": "seed.charge"}

    def ctx(step: str, results: dict[str, Any]) -> StepContext:
        return StepContext("r", "c", step, "step", 1, converted.input, results, "k")

    body = ctx("seed.mark_fulfilled", {"seed.receipt": "R", "seed.label": "L"})
    assert canvas_args(body) == [["L", "R"], 9]
    assert canvas_args(ctx("seed.charge", {"seed.reserve": "res"})) == ["res"]
    assert canvas_kwargs(ctx("seed.receipt", {"seed.charge": "ch"})) == {"x": 2}


def test_a_task_used_twice_gets_a_step_of_its_own_each_time() -> None:
    converted = from_canvas("twice", chain(label.s(1), label.s(), group(label.s(), receipt.s())))
    assert converted.workflow.step_names == (
        "seed.label", "seed.label-2", "seed.label-3", "seed.receipt",
    )


def test_a_group_and_a_chord_inside_a_group_are_converted() -> None:
    converted = from_canvas(
        "nested", group(chord([label.s(1), receipt.s(2)], charge.s()), reserve.s(3))
    )
    assert converted.workflow.after_map == {
        "seed.label": (),
        "seed.receipt": (),
        "seed.charge": ("seed.label", "seed.receipt"),
        "seed.reserve": (),
    }


def test_queue_priority_and_time_limit_options_become_the_steps() -> None:
    canvas = chain(
        reserve.s(1).set(queue="stock", priority=3), charge.s().set(time_limit=20)
    )
    wf = from_canvas("opts", canvas, queue="harbor").workflow
    assert wf.route("seed.reserve") == {
        "step": "seed.reserve", "queue": "stock", "priority": 3, "time_limit": 300.0,
    }
    assert wf.route("seed.charge")["queue"] == "harbor"
    assert wf.time_limit_for("seed.charge") == 20


@pytest.mark.parametrize(
    ("canvas", "fragment"),
    [
        (reserve.s(1).on_error(label.s()), "link_error callbacks are not supported"),
        (chain(reserve.s(1), charge.s().set(link=label.s())), "link callbacks"),
        (reserve.s(1).set(countdown=5), "option(s) ['countdown'] cannot be honoured"),
        (reserve.s(1).set(expires=60, queue="q"), "option(s) ['expires'] cannot be honoured"),
        (reserve.chunks([(1,), (2,)], 1), "celery.chunks is not supported"),
        (reserve.map([1, 2]), "celery.map is not supported"),
        (group(group(label.s(), receipt.s()), charge.s()), "a group directly inside a group"),
        (group(chain(reserve.s(), group(label.s(), receipt.s()))), "directly inside a group"),
        (chain(reserve.s(1), group(label.s(), receipt.s()).set(queue="q")), "options on a group"),
        (chain(reserve.s(), charge.s().set(priority=12)), "priority must be an int from 0 to 9"),
        ({"task": 3}, "is not a Celery signature"),
    ],
)
def test_what_saga_cannot_honour_is_refused_by_name(canvas: Any, fragment: str) -> None:
    with pytest.raises(DefinitionError) as caught:
        from_canvas("refused", canvas)
    assert fragment in str(caught.value)
    assert "'refused'" in str(caught.value)


def test_a_refused_task_option_names_its_step() -> None:
    with pytest.raises(DefinitionError) as caught:
        from_canvas("refused", chain(reserve.s(1), charge.s().set(eta="2030-01-01T00:00:00")))
    assert caught.value.steps == ("seed.charge",)
    assert "canvas.tasks[1]" in str(caught.value)


def test_a_canvas_of_the_registered_shape_runs_as_the_registered_workflow() -> None:
    registry = Registry()
    first = as_registered(registry, "seed.canvas", harbor(1))
    assert registry.get("seed.canvas") is first.workflow
    second = as_registered(registry, "seed.canvas", harbor(2))
    assert second.workflow is first.workflow
    assert second.input["canvas"]["seed.reserve"]["args"] == [2]

    with pytest.raises(DefinitionError, match="differ from those of registered version 1"):
        as_registered(registry, "seed.canvas", chain(reserve.s(1), charge.s()))
    moved = chain(
        reserve.s(1), charge.s().set(queue="payments"), group(label.s(), receipt.s()),
        mark_fulfilled.si(1),
    )
    with pytest.raises(DefinitionError, match="sets queue 'payments'"):
        as_registered(registry, "seed.canvas", moved)
