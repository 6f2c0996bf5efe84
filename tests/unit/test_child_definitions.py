"""Declaring child steps (wf.child): checked when declared, naming the step; a child given as a
Workflow is registered with its parent."""

from __future__ import annotations

import pytest

from saga import Registry, Workflow
from saga.errors import DefinitionError
from saga.steps.children import ChildStep, UndoChild


def _stock() -> Workflow:
    stock = Workflow("c.stock")
    stock.add_step("reserve", lambda ctx: {})
    return stock


def test_a_child_step_needs_a_workflow_or_a_workflow_name() -> None:
    wf = Workflow("c.bad")
    with pytest.raises(DefinitionError, match=r"'kid'.*workflow must be a Workflow"):
        wf.child("kid", workflow=42)  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match=r"'kid'.*workflow must be a Workflow"):
        wf.child("kid", workflow="no spaces allowed")


def test_a_child_steps_input_must_be_a_function_and_its_version_a_positive_int() -> None:
    wf = Workflow("c.bad")
    with pytest.raises(DefinitionError, match=r"'kid'.*input must be a function"):
        wf.child("kid", workflow="c.stock", input={"sku": 1})  # type: ignore[arg-type]
    with pytest.raises(DefinitionError, match=r"'kid'.*version must be an int >= 1"):
        wf.child("kid", workflow="c.stock", version=0)
    with pytest.raises(DefinitionError, match=r"'kid'.*version 2 differs"):
        wf.child("kid", workflow=_stock(), version=2)


def test_a_child_step_is_undone_by_its_child_not_by_a_compensation_of_its_own() -> None:
    wf = Workflow("c.parent")
    wf.child("kid", workflow="c.stock")
    assert isinstance(wf["kid"].compensation, UndoChild)
    with pytest.raises(DefinitionError, match=r"'kid'.*undone by its child"):
        wf.compensation("kid")(lambda ctx: None)
    with pytest.raises(DefinitionError, match=r"'raw'.*declare it with wf.child"):
        wf.add_step("raw", ChildStep(workflow="c.stock"))
    with pytest.raises(DefinitionError, match=r"'fake'.*declare it with wf.child"):
        wf.add_step("fake", lambda ctx: None, compensate=UndoChild())


def test_a_workflow_names_its_child_steps() -> None:
    wf = Workflow("c.parent")
    wf.add_step("plain", lambda ctx: None)
    wf.child("kid", workflow="c.stock", after=["plain"])
    assert wf.child_steps == ("kid",)


def test_registering_a_parent_registers_the_child_workflow_it_was_given() -> None:
    stock = _stock()
    parent = Workflow("c.parent")
    parent.child("kid", workflow=stock)
    registry = Registry(parent)
    assert registry.get("c.stock") is stock


def test_a_step_turned_into_a_child_step_changes_the_definition_hash() -> None:
    plain, nested = Workflow("c.parent"), Workflow("c.parent")
    plain.add_step("kid", lambda ctx: None)
    nested.child("kid", workflow="c.stock")
    assert plain.definition_hash != nested.definition_hash
