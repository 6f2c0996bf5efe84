"""Step kinds: what runs a step. Each kind knows how to run itself and how to name itself for the
definition hash; none imports Celery (the worker passes a :class:`TaskCaller` in)."""

from saga.steps.base import StepRunner, TaskCaller
from saga.steps.celery_task import CeleryTaskStep
from saga.steps.children import ChildStep, UndoChild
from saga.steps.function import FunctionStep
from saga.steps.transactional import TransactionalStep, is_transactional, transactional
from saga.steps.waits import Sleep, WaitForSignal, WaitStep

__all__ = [
    "CeleryTaskStep",
    "ChildStep",
    "FunctionStep",
    "Sleep",
    "StepRunner",
    "TaskCaller",
    "TransactionalStep",
    "UndoChild",
    "WaitForSignal",
    "WaitStep",
    "is_transactional",
    "transactional",
]
