"""A process's entry in the registry of live processes (``processes``).

A worker or a relay :meth:`~Presence.register` s itself at start (host, pid, saga's version,
the queues it consumes, the workflow definitions it has), :meth:`~Presence.beat` s while it
runs (at most every ``interval`` seconds however often it is called, so a loop may call it on
every turn) and :meth:`~Presence.remove` s itself on a clean exit. A process that died leaves
a row that stops being beaten: it counts as gone once not seen for ``stale_after`` seconds, and
rows not seen for ``prune_after`` are deleted. Database errors are logged, never raised: being
seen must not stop a worker or a relay.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable
from importlib import metadata
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from saga import logs
from saga.store.processes import ProcessStore

if TYPE_CHECKING:
    from saga.app import Saga

log = logging.getLogger("saga.presence")

BEAT_INTERVAL = 5.0
"""Seconds between beats (``SAGA_BEAT_INTERVAL``)."""
STALE_AFTER = 30.0
"""A process not seen for this long counts as gone (``saga status --stale-after``)."""
PRUNE_AFTER = 24 * 3600.0
"""Rows not seen for this long are deleted (kept until then to say when it was last seen)."""


def saga_version() -> str:
    """The installed saga's version."""
    try:
        return metadata.version("saga")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a source tree
        return "unknown"


def definitions_of(saga: Saga) -> list[dict[str, Any]]:
    """The workflow definitions (name, version, hash) of ``saga``'s registry."""
    return [
        {"name": wf.name, "version": wf.version, "hash": wf.definition_hash}
        for wf in sorted(saga.registry, key=lambda w: (w.name, w.version))
    ]


class Presence:
    """One process's row in ``processes``."""

    def __init__(
        self,
        saga: Saga,
        kind: str,
        *,
        name: str | None = None,
        queues: Iterable[str] = (),
        interval: float | None = None,
        prune_after: float = PRUNE_AFTER,
    ) -> None:
        self.saga = saga
        self.kind = kind
        self.id = str(uuid.uuid4())
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.name = name or f"{kind}@{self.host}:{self.pid}"
        self.queues = sorted(set(queues))
        self.interval = (
            float(os.environ.get("SAGA_BEAT_INTERVAL", BEAT_INTERVAL))
            if interval is None
            else interval
        )
        self.prune_after = prune_after
        self._store = ProcessStore(saga.tables)
        self._last_beat: float | None = None
        self._registered = False

    def _row(self) -> dict[str, Any]:
        return {
            "id": self.id, "kind": self.kind, "name": self.name[:200], "host": self.host[:200],
            "pid": self.pid, "version": saga_version()[:40],
        }

    def register(self) -> bool:
        """Insert this process's row and prune stale ones; whether it worked."""
        try:
            with self.saga.engine.begin() as conn:
                self._store.register(conn, self._row(), self.queues, definitions_of(self.saga))
                self._store.prune(conn, self.prune_after)
        except DBAPIError as exc:
            logs.event(log, logging.WARNING, f"could not register: {type(exc).__name__}")
            return False
        self._registered = True
        self._last_beat = time.monotonic()
        logs.event(
            log, logging.INFO, f"registered {self.kind} {self.name}",
            queues=",".join(self.queues),
        )
        return True

    def beat(self, *, force: bool = False) -> bool:
        """Mark this process seen, if ``interval`` has passed since the last beat (or
        ``force``); registers again when the row is missing. Whether a beat was written."""
        now = time.monotonic()
        if not force and self._last_beat is not None and now - self._last_beat < self.interval:
            return False
        self._last_beat = now
        if not self._registered:
            return self.register()
        try:
            with self.saga.engine.begin() as conn:
                if not self._store.beat(conn, self.id):
                    self._store.register(
                        conn, self._row(), self.queues, definitions_of(self.saga)
                    )
        except DBAPIError as exc:
            logs.event(log, logging.WARNING, f"could not beat: {type(exc).__name__}")
            return False
        return True

    def remove(self) -> None:
        """Delete this process's row (a clean exit)."""
        if not self._registered:
            return
        try:
            with self.saga.engine.begin() as conn:
                self._store.remove(conn, self.id)
        except DBAPIError as exc:
            logs.event(log, logging.WARNING, f"could not unregister: {type(exc).__name__}")
        self._registered = False


def beat_in_thread(presence: Presence, stopping: threading.Event) -> threading.Thread:
    """Beat ``presence`` from a daemon thread until ``stopping`` is set. (A worker's own beat
    until it shares the worker's heartbeat thread.)"""

    def loop() -> None:
        while not stopping.wait(presence.interval):
            presence.beat(force=True)

    thread = threading.Thread(target=loop, name="saga-presence", daemon=True)
    thread.start()
    return thread
