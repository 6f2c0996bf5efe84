"""The state table of saga.core.states, and the pure decisions checked against it."""

from __future__ import annotations

import pytest

from saga.core import states
from saga.core.attempts import AttemptRef, outcome_of
from saga.core.decide import decide_stop
from saga.core.states import TRANSITIONS, allowed, sources, target


def test_every_state_in_the_table_is_a_constrained_state() -> None:
    for t in TRANSITIONS:
        known = states.RUN_STATES if t.machine == "run" else states.STEP_STATES
        assert t.source in known and t.target in known, t


def test_only_finished_runs_have_no_way_out_but_a_retried_failed_or_an_undone_child() -> None:
    leaving = {t.source for t in TRANSITIONS if t.machine == "run"}
    assert set(states.RUN_STATES) - leaving == set(states.FINISHED_RUN_STATES) - {
        "failed", "completed"
    }


def test_a_finished_run_leaves_its_state_only_by_a_retry_or_its_parents_undo() -> None:
    for t in TRANSITIONS:
        if t.machine == "run" and t.source in states.FINISHED_RUN_STATES:
            assert (t.event, t.source) in {
                ("operator_retry", "failed"), ("undo_child", "completed")
            }, t


def test_every_step_state_is_reached_from_waiting_or_ready() -> None:
    reached = {"waiting", "ready"}
    while True:
        more = {t.target for t in TRANSITIONS if t.machine == "step" and t.source in reached}
        if more <= reached:
            break
        reached |= more
    assert reached == set(states.STEP_STATES)


def test_the_hot_path_events_have_single_sources_and_targets() -> None:
    assert sources("step", "claimed") == ("ready",)
    assert sources("step", "completed") == ("running",)
    assert target("step", "ready", "claimed") == "running"
    assert target("step", "running", "retry_scheduled") == "ready"
    with pytest.raises(KeyError):
        sources("step", "no_such_event")


def test_the_ends_of_a_stopping_run_are_in_the_table() -> None:
    for run_state in states.STOPPING:
        assert allowed("run", run_state, states.NOTHING_TO_UNDO_END[run_state])
        assert allowed("run", run_state, states.UNDO_END[run_state])
    assert states.LIVE_RUN_STATES["compensation"] == states.STOPPING


@pytest.mark.parametrize("run_state", states.STOPPING)
def test_a_stopping_run_with_nothing_started_ends_as_the_table_says(run_state: str) -> None:
    decision = decide_stop(run_state, {"a": (), "b": ("a",)}, {"a", "b"}, set(), set())
    assert decision.end_state is not None
    assert allowed("run", run_state, decision.end_state)


def test_a_stopping_run_undoes_every_started_step_with_a_compensation() -> None:
    after = {"a": (), "b": ("a",), "c": ("a",), "d": ("b", "c")}
    # b completed, c failed (its code raised), d never started; a has no compensation.
    decision = decide_stop("compensating", after, {"b", "c", "d"}, set(), {"a", "b", "c"})
    assert dict(decision.compensations) == {"b": 0, "c": 0}


def test_a_stopping_run_waits_while_a_step_still_runs() -> None:
    decision = decide_stop("cancelling", {"a": ()}, {"a"}, {"a"}, {"a"})
    assert decision.wait and not decision.compensations


def test_the_outcome_a_compensation_is_told() -> None:
    assert outcome_of("completed", None) == "completed"
    assert outcome_of("failed", {"type": "x.PermanentError"}) == "failed"
    assert outcome_of("failed", {"type": "saga.LeaseExpired", "outcome": "unknown"}) == "unknown"
    assert outcome_of("skipped", {"type": "StepTimeoutError", "outcome": "unknown"}) == "unknown"


def test_a_compensation_carries_the_idempotency_key_of_the_step_it_undoes() -> None:
    ref = AttemptRef("r1", "compensation", "charge", 2)
    assert ref.idempotency_key == "r1:compensation:charge"
    assert ref.step_idempotency_key == "r1:step:charge"
    assert AttemptRef("r1", "step", "charge", 5).idempotency_key == ref.step_idempotency_key


def test_the_hot_path_statements_stay_within_what_psycopg_caches() -> None:
    from psycopg._queries import MAX_CACHED_STATEMENT_LENGTH
    from sqlalchemy.dialects.postgresql import psycopg as dialect

    from saga.store.base import Tables
    from saga.store.outbox import _TAKE_BATCH
    from saga.transitions import _CLAIM, _COMPLETE

    # Longer statements are parsed again on every execution (a visible cost per step).
    for template in (_CLAIM, _COMPLETE, _TAKE_BATCH):
        compiled = str(Tables("saga").sql(template).compile(dialect=dialect.dialect()))
        assert len(compiled) <= MAX_CACHED_STATEMENT_LENGTH, len(compiled)
