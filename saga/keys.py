"""Business keys: what starting a run under a key does when the key already has a run."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any

from sqlalchemy.exc import IntegrityError

from saga.db.states import RUN_UNFINISHED

UNFINISHED_KEY_INDEX = "uq_runs_workflow_business_key_unfinished"
"""The unique index that lets a key have one unfinished run of a workflow at most."""


class KeyPolicy(enum.StrEnum):
    """What :meth:`saga.Saga.start` does when the business key already names a run of the
    workflow (the key's newest run). Declare it on the workflow (``Workflow(...,
    key_policy=...)``) or pass it to one start.

    - ``RETURN_EXISTING`` (the default): return that run (``Started.created`` is ``False``),
      whatever its input and state; the new input is not used.
    - ``REFUSE_CHANGED_INPUT``: return that run if its input equals the new one (as JSON), and
      raise :class:`~saga.errors.KeyConflictError` if it differs.
    - ``NEW_AFTER_FINISH``: return that run while it is unfinished (running, compensating,
      cancelling or ``compensation_failed``); once it has finished, start a new run, which the
      key then names (``saga list --key`` shows them all).
    """

    RETURN_EXISTING = "return_existing"
    REFUSE_CHANGED_INPUT = "refuse_changed_input"
    NEW_AFTER_FINISH = "new_after_finish"


def key_policy(value: object, what: str = "key_policy") -> KeyPolicy:
    """``value`` (a :class:`KeyPolicy` or its string) as a policy, or ``ValueError``."""
    try:
        return KeyPolicy(value if isinstance(value, str) else repr(value))
    except ValueError:
        choices = ", ".join(repr(p.value) for p in KeyPolicy)
        raise ValueError(f"{what} must be one of {choices}, got {value!r}") from None


def is_unfinished_key_conflict(exc: IntegrityError) -> bool:
    """Whether ``exc`` is the database refusing a second unfinished run of one key (an
    operator's retry of a run whose key has since started a newer one)."""
    return UNFINISHED_KEY_INDEX in str(exc.orig)


def rerun_refusal(run: Mapping[str, Any], latest_id: str) -> str | None:
    """Why ``run`` cannot be started again as a new run, or ``None``: it has not finished, or
    its key names a newer run (``latest_id``)."""
    if run["state"] in RUN_UNFINISHED:
        return (
            f"run {run['id']} is {run['state']}: only a finished run can be run again "
            "(retry, cancel or resolve it first)"
        )
    if latest_id != str(run["id"]):
        return (
            f"run {run['id']}: key {run['business_key']!r} names a newer run, {latest_id}; "
            "rerun that one"
        )
    return None
