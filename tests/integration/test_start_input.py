"""Input and keys that JSON accepts but PostgreSQL cannot store are refused at start, naming the
place, before anything reaches the database: the caller's transaction goes on as if nothing
happened."""

from __future__ import annotations

from typing import Any

import pytest
from sqlalchemy import text
from sqlalchemy.orm import Session

from saga import InputError, Saga
from saga.codec import MAX_DEPTH


def nested(depth: int) -> list[Any]:
    """A list nested ``depth`` levels deep (built without recursion)."""
    root: list[Any] = []
    inner = root
    for _ in range(depth - 1):
        child: list[Any] = []
        inner.append(child)
        inner = child
    return root


@pytest.mark.parametrize(
    ("input", "key", "fragment"),
    [
        (
            {"items": [{"sku": "a"}, {}, {}, {"sku": "b\x00c"}]},
            None,
            "input['items'][3]['sku']: NUL byte",
        ),
        ({"a\x00b": 1}, None, "input['a\\x00b']: NUL byte in a key"),
        ({"name": "caf\ud800"}, None, "input['name']: lone surrogate '\\ud800'"),
        ({"deep": nested(10_000)}, None, f"nested more than {MAX_DEPTH} levels deep"),
        ({}, "order-\x00-1", "key: NUL byte"),
        ({}, "order-\udc80", "key: lone surrogate '\\udc80'"),
    ],
    ids=["nul-in-input", "nul-in-a-key-of-input", "surrogate-in-input", "10000-deep",
         "nul-in-key", "surrogate-in-key"],
)
def test_unstorable_input_or_key_is_an_input_error_and_the_callers_transaction_goes_on(
    saga_engine: Saga, input: Any, key: str | None, fragment: str
) -> None:
    with Session(saga_engine.engine) as session:
        session.execute(text("CREATE TABLE orders (id int primary key)"))
        session.execute(text("INSERT INTO orders VALUES (1)"))
        kept = saga_engine.start(session, "it.linear", {"order": 1}, key="order-1").run_id

        with pytest.raises(InputError) as caught:
            saga_engine.start(session, "it.linear", input, key=key)

        # Still usable: nothing was sent, so nothing was aborted.
        session.execute(text("INSERT INTO orders VALUES (2)"))
        session.commit()

    assert fragment in str(caught.value)
    assert str(caught.value).startswith("workflow 'it.linear', ")
    with saga_engine.engine.connect() as conn:
        assert conn.execute(text("SELECT count(*) FROM orders")).scalar() == 2
        runs = conn.execute(text("SELECT id::text FROM saga.runs")).scalars().all()
    assert runs == [kept]


def test_input_nested_to_the_limit_is_accepted(saga_engine: Saga) -> None:
    started = saga_engine.start_now("it.linear", nested(MAX_DEPTH))

    assert started.created
