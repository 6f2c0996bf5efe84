"""Declaring maps over a list: a wrong one fails when declared, naming the step; an
instance's name resolves to a step of its own with the map's policies."""

from __future__ import annotations

from typing import Any

import pytest

from saga import DefinitionError, RetryPolicy, Workflow
from saga.maps import release_of
from saga.steps.maps import MAX_MAP_NAME, instance_name, parse_instance


def _src(ctx: Any) -> list[int]:
    return [1, 2]


def _fn(ctx: Any) -> int:
    return 1


def _undo(ctx: Any) -> None:
    return None


def _wf(max_parallel: int | None = None) -> Workflow:
    wf = Workflow("w")
    wf.add_step("src", _src)
    wf.map("each", _fn, over="src", max_parallel=max_parallel, compensate=_undo,
           retry=RetryPolicy(max_attempts=7), time_limit=12)
    wf.add_step("join", _fn, after=["each"])
    return wf


def test_a_map_over_an_undeclared_step_is_refused_naming_the_map() -> None:
    wf = Workflow("w")
    with pytest.raises(DefinitionError, match=r"step 'each', 'nope'.*unknown step 'nope'"):
        wf.map("each", _fn, over="nope")


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "3"])
def test_a_bad_max_parallel_is_refused_naming_the_map(bad: Any) -> None:
    wf = Workflow("w")
    wf.add_step("src", _src)
    with pytest.raises(DefinitionError, match=r"step 'each'.*max_parallel must be an int >= 1"):
        wf.map("each", _fn, over="src", max_parallel=bad)


def test_a_map_name_too_long_for_its_instances_names_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("src", _src)
    with pytest.raises(DefinitionError, match=f"at most {MAX_MAP_NAME} characters"):
        wf.map("m" * (MAX_MAP_NAME + 1), _fn, over="src")


def test_a_map_of_a_wait_is_refused() -> None:
    wf = Workflow("w")
    wf.add_step("src", _src)
    wf.sleep("nap", for_=1)
    with pytest.raises(DefinitionError, match=r"step 'each'.*not a wait or a map"):
        wf.map("each", wf["nap"].runner, over="src")


def test_a_map_runs_after_its_source_and_its_instances_resolve_to_steps_with_its_policies() -> (
    None
):
    wf = _wf()
    assert wf["each"].after == ("src",)
    name = instance_name("each", 42)
    assert name == "each[00042]" and parse_instance(name) == ("each", 42)
    assert name in wf and "each[42]" not in wf and "src[00001]" not in wf
    inst = wf[name]
    assert inst.after == () and inst.compensation is not None
    assert wf.retry_for(name, "step").max_attempts == 7
    assert wf.time_limit_for(name) == 12
    assert wf.route(name)["step"] == name


def test_an_instance_releases_the_join_and_the_instance_max_parallel_after_it() -> None:
    assert release_of(_wf(), "step", "each[00003]") == ("join",)
    assert release_of(_wf(max_parallel=4), "step", "each[00003]") == ("join", "each[00007]")
    assert release_of(_wf(), "compensation", "each[00003]") == ("each", "src")


def test_a_map_with_a_compensation_changes_the_definition_hash() -> None:
    plain = Workflow("w")
    plain.add_step("src", _src)
    plain.map("each", _fn, over="src")
    assert plain.definition_hash != _wf().definition_hash


def test_changing_a_maps_max_parallel_changes_the_definition_hash() -> None:
    # Which instance releases which depends on it: a running run must keep its own.
    assert _wf(max_parallel=3).definition_hash != _wf(max_parallel=4).definition_hash
    assert _wf().definition_hash != _wf(max_parallel=4).definition_hash


def test_a_source_result_over_the_most_items_a_map_expands_to_is_refused_with_a_clear_error() -> (
    None
):
    from saga.maps import MapItemsError, Maps
    from saga.steps.maps import MAX_MAP_ITEMS

    wf = _wf()
    assert Maps.check_items(wf, "each", list(range(MAX_MAP_ITEMS))) == MAX_MAP_ITEMS
    with pytest.raises(MapItemsError, match=r"map 'each': step 'src' returned 100001 items"):
        Maps.check_items(wf, "each", list(range(MAX_MAP_ITEMS + 1)))
    with pytest.raises(MapItemsError, match="needs a list from step 'src', got str"):
        Maps.check_items(wf, "each", "abc")
