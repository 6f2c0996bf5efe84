"""Named fault points: places where a test makes a real fault happen at an exact moment, such as
a connection cut right after the server committed a completion (the client never hears of it).

They are off unless the ``SAGA_FAULTS`` environment variable of the process names them, as
``point:detail`` entries separated by commas (``hot_path.reply_lost:complete``). Checking one
costs a set lookup. Points:

- ``hot_path.reply_lost:<statement>``: after a hot-path ``claim`` or ``complete`` statement
  committed, the connection's socket is shut down before the reply is used, so the caller
  sees the same error as when the reply is lost on the network.
- ``transactional.kill:<before_commit|after_commit>:attempt<n>``: the worker process kills
  itself (SIGKILL) just before, or just after, the transaction of a transactional step's
  attempt ``n`` commits.
- ``executor.kill:before_claim:<step>``: the worker process kills itself (SIGKILL) when it
  has a message for ``step`` and has not claimed it yet (every time: a worker armed with it
  never runs that step).
"""

from __future__ import annotations

import logging
import os
import signal
import socket

from sqlalchemy import Connection

log = logging.getLogger("saga.faults")


def _parse(value: str) -> frozenset[str]:
    return frozenset(part.strip() for part in value.split(",") if part.strip())


_ARMED = _parse(os.environ.get("SAGA_FAULTS", ""))


def armed(point: str, detail: str) -> bool:
    """Whether ``point:detail`` is armed in this process."""
    return bool(_ARMED) and f"{point}:{detail}" in _ARMED


def kill_if_armed(point: str, detail: str) -> None:
    """SIGKILL this process if ``point:detail`` is armed: a crash at exactly this place."""
    if armed(point, detail):
        log.warning("fault point %s:%s: killing this process", point, detail)
        os.kill(os.getpid(), signal.SIGKILL)


def cut_connection(conn: Connection, point: str) -> None:
    """Shut the socket of ``conn`` down for real: its next use fails as a lost connection."""
    log.warning("fault point %s: cutting the database connection", point)
    raw = conn.connection.dbapi_connection
    fileno = raw.pgconn.socket  # type: ignore[union-attr]
    # Shut down a duplicate of the descriptor: the socket goes down, and libpq keeps a valid
    # descriptor to fail on (closing its own would let the number be reused under it).
    with socket.socket(fileno=os.dup(fileno)) as sock:
        sock.shutdown(socket.SHUT_RDWR)
