"""A small process supervisor for the demo: starts named children, restarts one that exits on
its own (a Celery worker's main process can exit when the broker goes away), and stops them
all in reverse order: SIGTERM, then SIGKILL to the process group past a deadline."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    """One supervised process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    exits: list[int] = field(default_factory=list)
    stopping: bool = False


class Supervisor:
    """Runs children in their own sessions (a Ctrl-C in the terminal reaches only the
    orchestrator, which then stops them in order), each writing to ``<log_dir>/<name>.log``."""

    def __init__(
        self,
        log_dir: Path,
        *,
        cwd: str | None = None,
        backoff: float = 1.0,
        say: Callable[[str], None] = print,
    ) -> None:
        self.log_dir = log_dir
        self.cwd = cwd
        self.backoff = backoff
        self.say = say
        self.children: dict[str, Child] = {}
        self._lock = threading.Lock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str]) -> Child:
        """Start ``argv`` as ``name`` with ``env`` added to this process's environment."""
        child = Child(name, list(argv), {**os.environ, **env}, self.log_dir / f"{name}.log")
        with self._lock:
            self.children[name] = child
            self._spawn(child)
        return child

    def _spawn(self, child: Child) -> None:
        with open(child.log_path, "ab") as out:
            out.write(f"--- supervisor: starting {' '.join(child.argv)}\n".encode())
            out.flush()
            child.proc = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child.env,
                cwd=self.cwd,
                start_new_session=True,
            )

    def _watch(self) -> None:
        due: dict[str, float] = {}
        while not self._closed.wait(0.2):
            with self._lock:
                for name, child in self.children.items():
                    if child.stopping or child.proc is None:
                        continue
                    code = child.proc.poll()
                    if code is None:
                        continue
                    now = time.monotonic()
                    if name not in due:
                        child.exits.append(code)
                        self.say(f"supervisor: {name} exited with {code}; restarting it")
                        due[name] = now + self.backoff
                    elif now >= due[name]:
                        del due[name]
                        self._kill_group(child, signal.SIGKILL)  # leftovers of the old group
                        child.restarts += 1
                        self._spawn(child)

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to a child's main process (it will be restarted)."""
        child = self.children[name]
        if child.proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(child.proc.pid, sig)

    def restarts(self) -> dict[str, int]:
        """How often each child was restarted."""
        return {name: c.restarts for name, c in self.children.items()}

    def stop_all(self, timeout: float = 10.0) -> None:
        """Stop every child, newest first: SIGTERM, and SIGKILL to its process group after
        ``timeout`` seconds. Safe to call twice."""
        with self._lock:
            children = list(self.children.values())[::-1]
            for child in children:
                child.stopping = True
        self._closed.set()
        for child in children:
            proc = child.proc
            if proc is None or proc.poll() is not None:
                continue
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for child in children:
            proc = child.proc
            if proc is None:
                continue
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.say(f"supervisor: {child.name} did not stop in {timeout:.0f}s; killing it")
            self._kill_group(child, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)

    @staticmethod
    def _kill_group(child: Child, sig: int) -> None:
        if child.proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.proc.pid, sig)
