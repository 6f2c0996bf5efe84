"""Sampling profiles of the benchmark's own processes (the worker and its pool, the relay),
taken with py-spy while a workload runs, and where their time went.

py-spy (``pip install "saga[bench]"``) samples the stacks of running processes from outside,
so the processes run as they do in the benchmark, unchanged. Each recording is kept as
py-spy's "raw" collapsed stacks (``<dir>/<name>.txt``, for flame graph tools); the summary
counts every sample once, under the first category its stack falls in, from the leaf up:
waiting on PostgreSQL, on the broker, in Celery's and kombu's own code, in saga, and idle.
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

# (category, substrings of a frame that put a sample in it), tried on each frame from the
# leaf up: a sample in psycopg called from saga counts as PostgreSQL.
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("idle (waiting for work)", ("select (selectors.py", "poll (selectors.py", "_poll ",
                                 "wait (threading.py", "epoll", "billiard/pool.py",
                                 "_do_blocking_read", "recv (multiprocessing")),
    ("PostgreSQL (psycopg: sending, waiting, reading)", ("psycopg/",)),
    ("broker (redis-py, sockets)", ("redis/", "socket.py", "amqp/")),
    ("Celery and kombu", ("celery/", "kombu/", "billiard/")),
    ("SQLAlchemy", ("sqlalchemy/",)),
    ("OpenTelemetry", ("opentelemetry/",)),
    ("saga", ("saga/",)),
    ("JSON", ("json/",)),
    ("logging", ("logging/",)),
)


def available() -> bool:
    """Whether py-spy is installed next to this interpreter or on the PATH."""
    return _binary() is not None


def _binary() -> str | None:
    beside = Path(sys.executable).with_name("py-spy")  # a virtualenv's bin/, not on PATH
    return str(beside) if beside.exists() else shutil.which("py-spy")


@contextmanager
def recording(directory: Path, name: str, pid: int, rate: int = 250) -> Iterator[Path]:
    """Record process ``pid`` and its children at ``rate`` samples per second while the block
    runs; yields the file the raw stacks are written to when the block ends."""
    binary = _binary()
    if binary is None:
        raise RuntimeError('py-spy is not installed: pip install "saga[bench]"')
    directory.mkdir(parents=True, exist_ok=True)
    out = directory / f"{name}.txt"
    argv = [binary, "record", "--pid", str(pid), "--subprocesses", "--rate", str(rate),
            "--format", "raw", "--output", str(out), "--nonblocking"]
    log = open(directory / f"{name}.py-spy.log", "wb")  # noqa: SIM115 - closed below
    spy = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT)
    try:
        yield out
    finally:
        spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        try:
            spy.wait(timeout=30)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()
        log.close()


def categorise(stack: Sequence[str]) -> str:
    """The category of a sample whose frames are ``stack`` (root first)."""
    for frame in reversed(stack):
        for category, marks in CATEGORIES:
            if any(mark in frame for mark in marks):
                return category
    return "other (interpreter, stdlib)"


def summary(path: Path) -> dict[str, Any]:
    """Samples by category (percent of the busy samples, idle apart) and the top leaf
    functions of a raw py-spy recording."""
    by_category: Counter[str] = Counter()
    leaves: Counter[str] = Counter()
    total = 0
    if path.exists():
        for line in path.read_text(errors="replace").splitlines():
            stack_text, _, count_text = line.rpartition(" ")
            if not count_text.isdigit():
                continue
            count = int(count_text)
            frames = stack_text.split(";")
            category = categorise(frames)
            by_category[category] += count
            total += count
            if not category.startswith("idle"):
                leaves[frames[-1]] += count
    idle = sum(n for c, n in by_category.items() if c.startswith("idle"))
    busy = max(total - idle, 1)
    return {
        "samples": total,
        "idle_share": round(idle / max(total, 1), 3),
        "busy_by_category_pct": {
            c: round(100 * n / busy, 1)
            for c, n in by_category.most_common()
            if not c.startswith("idle")
        },
        "top_leaves_pct": {f: round(100 * n / busy, 1) for f, n in leaves.most_common(12)},
    }
