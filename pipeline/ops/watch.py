"""Processes a run starts and depends on, watched: waits end as soon as one exits.

The benchmarks start `pipeline run ...` processes and wait for what those store; the
demo starts its NATS and PostgreSQL servers. A child that exits while it is still
needed (a worker that refuses its configuration, a server that crashed) stops the wait
within a poll interval with `ChildExited`, which carries the last lines of the child's
log, instead of a time-out that says nothing of why.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ..errors import PipelineError

__all__ = ["TAIL_LINES", "Child", "ChildExited", "Watch", "last_lines", "terminate_as_interrupt"]

T = TypeVar("T")

TAIL_LINES = 20
"""How many of a child's last log lines `ChildExited` carries."""
_TAIL_BYTES = 64 * 1024


def last_lines(path: Path, count: int = TAIL_LINES) -> list[str]:
    """The last `count` non-blank lines of a log file ([] when there is none)."""
    try:
        with path.open("rb") as log:
            log.seek(max(0, log.seek(0, os.SEEK_END) - _TAIL_BYTES))
            text = log.read().decode(errors="replace")
    except OSError:
        return []
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-count:]


def terminate_as_interrupt() -> None:
    """From now on a SIGTERM to this process raises `KeyboardInterrupt` in its main thread,
    as Ctrl-C does: the run's `finally` blocks stop the processes it started and remove
    what it made. (By default SIGTERM ends Python at once, and a benchmark stopped with
    `kill` or `timeout` left its workers running and its schema behind.) Call it from the
    main thread of a run's entry point. A `kill -9` still leaves them: nothing runs then."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)


class ChildExited(PipelineError, RuntimeError):
    """A process this one started, and still needed, exited; its last log lines say why."""

    def __init__(self, name: str, code: int | None, log: Path | None, lines: Sequence[str]):
        self.name = name
        self.code = code
        self.log = log
        self.lines = list(lines)
        super().__init__(str(self))

    def __str__(self) -> str:
        code = "" if self.code is None else f" with code {self.code}"
        where = "" if self.log is None else f" (log {self.log})"
        if not self.lines:
            return f"{self.name} exited{code}{where}, writing nothing"
        tail = "\n".join(f"    {line}" for line in self.lines)
        return f"{self.name} exited{code}{where}; its last lines:\n{tail}"


class Child:
    """A process this one started and depends on, and the file its output goes to.

    `process` is a `Popen`, or the pid of a server that runs detached (PostgreSQL's
    postmaster), whose exit code is then unknown.
    """

    def __init__(
        self, name: str, process: subprocess.Popen[bytes] | int, log: Path | None = None
    ) -> None:
        self.name = name
        self.process = process
        self.log = log

    @classmethod
    def start(
        cls,
        name: str,
        argv: Sequence[str],
        *,
        log: Path,
        env: Mapping[str, str] | None = None,
        **popen: Any,
    ) -> Child:
        """Start `argv` with its stdout and stderr appended to `log`."""
        with log.open("ab") as out:
            process = subprocess.Popen(
                list(argv), env=env, stdout=out, stderr=subprocess.STDOUT, **popen
            )
        return cls(name, process, log)

    @property
    def pid(self) -> int:
        """The process id."""
        return self.process if isinstance(self.process, int) else self.process.pid

    def running(self) -> bool:
        """Whether the process still runs."""
        if not isinstance(self.process, int):
            return self.process.poll() is None
        return _alive(self.process)

    def exited(self) -> ChildExited:
        """The error saying that it exited, with its last log lines."""
        code = None if isinstance(self.process, int) else self.process.returncode
        lines = [] if self.log is None else last_lines(self.log)
        return ChildExited(self.name, code, self.log, lines)

    def check(self) -> None:
        """Raise `ChildExited` if the process no longer runs."""
        if not self.running():
            raise self.exited()

    def stop(self, timeout_s: float = 60.0) -> None:
        """Stop it gracefully (SIGTERM), killing it after `timeout_s`."""
        if isinstance(self.process, int):
            raise TypeError(f"{self.name} is not a child of this process: stop it its own way")
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _alive(pid: int) -> bool:
    """Whether a process that is not this one's child runs (a zombie does not)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's: it exists
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return True  # no /proc here: the signal's answer stands
    return state not in ("Z", "X")


class Watch:
    """The processes a run depends on; its waits end as soon as one of them exits."""

    def __init__(self, *children: Child, interval_s: float = 0.05) -> None:
        self.children = list(children)
        self.interval_s = interval_s

    def add(self, child: Child) -> Child:
        """Watch `child` from now on."""
        self.children.append(child)
        return child

    def start(
        self, name: str, argv: Sequence[str], *, log: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        """Start a process (`Child.start`) and watch it."""
        return self.add(Child.start(name, argv, log=log, env=env))

    def stop(self, child: Child, timeout_s: float = 60.0) -> None:
        """Stop watching `child` (its exit is expected now), then stop it."""
        if child in self.children:
            self.children.remove(child)
        child.stop(timeout_s)

    def check(self) -> None:
        """Raise `ChildExited` for the first watched process that no longer runs."""
        for child in self.children:
            child.check()

    def wait_until(
        self,
        done: Callable[[], bool],
        *,
        timeout_s: float,
        waiting_for: str | Callable[[], str],
        interval_s: float | None = None,
    ) -> None:
        """Poll `done` until it is true; `ChildExited` as soon as a watched process exits,
        `TimeoutError(waiting_for)` after `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while not done():
            self.check()
            if time.monotonic() > deadline:
                raise TimeoutError(waiting_for if isinstance(waiting_for, str) else waiting_for())
            time.sleep(self.interval_s if interval_s is None else interval_s)

    async def guard(self, body: Awaitable[T]) -> T:
        """Await `body`; if a watched process exits first, cancel it and raise `ChildExited`.

        A body that fails because a process it talks to died (a connection refused) often
        fails before the exit is seen: a failure within `interval_s` of an exit is
        reported as `ChildExited`, the body's error as its cause.
        """
        task = asyncio.ensure_future(body)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=self.interval_s)
                if done:
                    break
                self.check()
        finally:
            if not task.done():
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        error = task.exception()
        if error is not None:
            deadline = time.monotonic() + self.interval_s
            while True:
                try:
                    self.check()
                except ChildExited as exited:
                    raise exited from error
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(min(0.05, self.interval_s))
        return task.result()
