"""A small process supervisor for tests: runs workers and relays like systemd would.

Each child runs in its own process group with its output in a log file. A watcher thread
restarts a child that exits without being asked to (after a short backoff), so tests can kill
processes, or take a broker away, and check that the system recovers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

STOP_TIMEOUT = 10.0
RESTART_BACKOFF = 0.5


@dataclass
class _Child:
    name: str
    argv: list[str]
    env: dict[str, str] | None
    cwd: str | None
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    stopping: bool = False
    exits: list[int] = field(default_factory=list)


class Supervisor:
    """Start, kill, restart and stop named child processes."""

    def __init__(
        self, log_dir: str | os.PathLike[str] | None = None, backoff: float = RESTART_BACKOFF
    ) -> None:
        self.log_dir = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="saga-procs-"))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.backoff = backoff
        self._children: dict[str, _Child] = {}
        self._lock = threading.RLock()
        self._closed = threading.Event()
        self._watcher = threading.Thread(target=self._watch, name="supervisor", daemon=True)
        self._watcher.start()

    # -- running -----------------------------------------------------------------------------

    def start(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
    ) -> int:
        """Launch ``argv`` as ``name`` (``env`` is added to this process's environment);
        returns its pid."""
        with self._lock:
            existing = self._children.get(name)
            if existing is not None and existing.proc is not None and existing.proc.poll() is None:
                raise RuntimeError(f"process {name!r} is already running")
            child = _Child(
                name=name,
                argv=list(argv),
                env={**os.environ, **env} if env is not None else None,
                cwd=str(cwd) if cwd is not None else None,
                log_path=self.log_dir / f"{name}.log",
            )
            self._children[name] = child
            self._spawn(child)
            assert child.proc is not None
            return child.proc.pid

    def _spawn(self, child: _Child) -> None:
        with open(child.log_path, "ab") as out:
            out.write(f"--- supervisor: starting {child.argv!r}\n".encode())
            out.flush()
            child.proc = subprocess.Popen(
                child.argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=child.env,
                cwd=child.cwd,
                start_new_session=True,
            )
        child.stopping = False

    def _watch(self) -> None:
        due: dict[str, float] = {}
        while not self._closed.wait(0.05):
            with self._lock:
                now = time.monotonic()
                for name, child in self._children.items():
                    proc = child.proc
                    if child.stopping or proc is None:
                        due.pop(name, None)
                        continue
                    code = proc.poll()
                    if code is None:
                        continue
                    if name not in due:
                        child.exits.append(code)
                        self._note(child, f"exited with {code}; restarting in {self.backoff}s")
                        due[name] = now + self.backoff
                    elif now >= due[name]:
                        del due[name]
                        child.restarts += 1
                        try:
                            self._spawn(child)
                        except OSError as exc:
                            self._note(child, f"restart failed: {exc!r}")
                            child.stopping = True

    def _note(self, child: _Child, text: str) -> None:
        with open(child.log_path, "ab") as out:
            out.write(f"--- supervisor: {child.name} {text}\n".encode())

    # -- controlling -------------------------------------------------------------------------

    def _get(self, name: str) -> _Child:
        try:
            return self._children[name]
        except KeyError:
            raise KeyError(f"no process named {name!r}") from None

    def kill(self, name: str, sig: int = signal.SIGKILL, group: bool = True) -> None:
        """Send ``sig`` to the process (its whole group by default). Unless :meth:`stop` was
        called, the watcher restarts it once it has exited."""
        with self._lock:
            proc = self._get(name).proc
            if proc is None or proc.poll() is not None:
                return
            with contextlib.suppress(ProcessLookupError):
                if group:
                    os.killpg(proc.pid, sig)
                else:
                    os.kill(proc.pid, sig)

    def stop(self, name: str, timeout: float = STOP_TIMEOUT) -> int | None:
        """SIGTERM the process group, SIGKILL it after ``timeout`` s; it is not restarted.
        Returns the exit code (``None`` if it never ran)."""
        with self._lock:
            child = self._get(name)
            child.stopping = True
            proc = child.proc
        if proc is None:
            return None
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        # Leftover grandchildren in the group (e.g. celery's pool) go too.
        _signal_group(proc.pid, signal.SIGKILL)
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every process (in parallel) and the watcher."""
        with self._lock:
            names = list(self._children)
            for name in names:
                self._children[name].stopping = True
        threads = [threading.Thread(target=self.stop, args=(n,)) for n in names]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        self._closed.set()
        self._watcher.join(timeout=5)

    # -- reading -----------------------------------------------------------------------------

    def pid(self, name: str) -> int | None:
        """The pid of the current incarnation, or ``None`` when it is not running."""
        with self._lock:
            proc = self._get(name).proc
            return proc.pid if proc is not None and proc.poll() is None else None

    def running(self, name: str) -> bool:
        """Whether the process is alive right now."""
        return self.pid(name) is not None

    def restarts(self, name: str) -> int:
        """How many times the watcher restarted the process."""
        with self._lock:
            return self._get(name).restarts

    def exit_codes(self, name: str) -> list[int]:
        """Exit codes of the unexpected exits seen so far."""
        with self._lock:
            return list(self._get(name).exits)

    def log_path(self, name: str) -> Path:
        """The file the process's stdout and stderr go to."""
        return self._get(name).log_path

    def log(self, name: str) -> str:
        """Everything the process (every incarnation) wrote so far."""
        path = self.log_path(name)
        return path.read_text(errors="replace") if path.exists() else ""

    def names(self) -> list[str]:
        """Names of every process started."""
        with self._lock:
            return list(self._children)

    def tail(self, name: str, lines: int = 40) -> str:
        """The last ``lines`` lines of the process's log."""
        return "\n".join(self.log(name).splitlines()[-lines:])

    def __enter__(self) -> Supervisor:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_all()


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def child_pids(pid: int) -> set[int]:
    """The pids of the processes whose parent is ``pid`` (from /proc), e.g. a Celery worker's
    pool processes."""
    children: set[int] = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:  # it exited meanwhile
            continue
        # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
        fields = stat[stat.rfind(")") + 2 :].split()
        if len(fields) > 1 and int(fields[1]) == pid:
            children.add(int(entry.name))
    return children
