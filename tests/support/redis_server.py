"""A private Redis server for tests that kill or slow down their broker: never the shared one."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from collections.abc import Iterator, Sequence
from pathlib import Path

import redis

from tests.support.waiting import wait_until


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """A private Redis server on a port of its own (never the shared one), killed and started
    again by its pid; it keeps nothing on disk, so a restart loses every message."""

    def __init__(self, workdir: Path, extra: Sequence[str] = ()) -> None:
        self.port = _free_port()
        self.workdir = workdir
        self.extra = list(extra)
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._proc: subprocess.Popen[bytes] | None = None

    def up(self) -> bool:
        """Whether the server answers PING."""
        client = redis.Redis(
            host="127.0.0.1", port=self.port, socket_timeout=1, socket_connect_timeout=1
        )
        try:
            return bool(client.ping())
        except redis.RedisError:
            return False
        finally:
            client.close()

    def start(self) -> None:
        """Start it (empty) and wait until it answers."""
        if self._proc is not None and self._proc.poll() is None:
            return
        argv = ["redis-server", "--bind", "127.0.0.1", "--port", str(self.port), "--save", "",
                "--appendonly", "no", "--dir", str(self.workdir), *self.extra]
        log = open(self.workdir / "redis.log", "ab")  # noqa: SIM115 - the child keeps it
        self._proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
        wait_until(self.up, timeout=15, interval=0.1, message="private Redis did not start")

    def kill(self) -> None:
        """SIGKILL it: nothing is saved."""
        if self._proc is not None and self._proc.poll() is None:
            os.kill(self._proc.pid, signal.SIGKILL)
            self._proc.wait(10)
        wait_until(lambda: not self.up(), timeout=10, message="Redis did not go down")

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """Kill Redis for the duration of the block; it is started again (empty) whatever
        happens."""
        try:
            self.kill()
            yield
        finally:
            self.start()

    def stop(self) -> None:
        """Stop it for good."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.kill()
            self._proc.wait(10)
