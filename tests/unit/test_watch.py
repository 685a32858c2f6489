"""Watched processes: a wait ends within a poll interval of a child's exit, with its last
log lines, instead of running into its time-out."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.ops.watch import TAIL_LINES, Child, ChildExited, Watch, last_lines

# A child that writes a few lines, then refuses to start, as a misconfigured worker does.
REFUSES = (
    "import sys\n"
    "for n in range(30): print(f'starting, step {n}', flush=True)\n"
    "print('configuration error: PIPELINE_MAX_FRAME_BYTES: too large', file=sys.stderr)\n"
    "sys.exit(2)\n"
)
SLEEPS = "import time; time.sleep(60)"


def _python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def test_a_wait_stops_within_a_second_of_a_child_exiting_with_its_last_lines(
    tmp_path: Path,
) -> None:
    watch = Watch()
    log = tmp_path / "worker.log"
    child = watch.start("worker", _python(REFUSES), log=log)
    started = time.monotonic()
    with pytest.raises(ChildExited) as raised:
        watch.wait_until(lambda: False, timeout_s=600, waiting_for="0 of 8 events committed")
    assert time.monotonic() - started < 2.0
    exited = raised.value
    assert (exited.name, exited.code, exited.log) == ("worker", 2, log)
    assert len(exited.lines) == TAIL_LINES
    assert exited.lines[-1] == "configuration error: PIPELINE_MAX_FRAME_BYTES: too large"
    assert exited.lines[0] == "starting, step 11"  # the last 20 lines, stdout and stderr
    message = str(exited)
    assert message.startswith(f"worker exited with code 2 (log {log}); its last lines:\n")
    assert message.endswith("\n    configuration error: PIPELINE_MAX_FRAME_BYTES: too large")
    assert isinstance(exited, RuntimeError)
    assert not child.running()


def test_a_wait_that_is_met_ignores_children_and_one_that_is_not_times_out(
    tmp_path: Path,
) -> None:
    watch = Watch()
    child = watch.start("sleeper", _python(SLEEPS), log=tmp_path / "sleeper.log")
    try:
        watch.wait_until(lambda: True, timeout_s=0.1, waiting_for="nothing")
        with pytest.raises(TimeoutError, match="only 0 of 8"):
            watch.wait_until(lambda: False, timeout_s=0.2, waiting_for=lambda: "only 0 of 8")
    finally:
        watch.stop(child, timeout_s=5)
    assert child not in watch.children
    watch.check()  # stopped on purpose: no longer watched


def test_guard_cancels_the_body_when_a_child_exits(tmp_path: Path) -> None:
    watch = Watch(interval_s=0.05)
    watch.start("server", _python(REFUSES), log=tmp_path / "server.log")
    cancelled = asyncio.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async def run() -> None:
        with pytest.raises(ChildExited, match="configuration error"):
            await asyncio.wait_for(watch.guard(forever()), timeout=5)
        assert cancelled.is_set()

    asyncio.run(run())


def test_guard_reports_a_body_that_failed_because_its_child_died(tmp_path: Path) -> None:
    """A client of a dead server fails before the exit is seen: the exit is the error."""
    child = Child.start("server", _python(REFUSES), log=tmp_path / "server.log")
    watch = Watch(child, interval_s=2.0)

    async def client() -> None:
        await asyncio.to_thread(child.process.wait)  # type: ignore[union-attr]
        raise ConnectionRefusedError("connect call failed")

    with pytest.raises(ChildExited) as raised:
        asyncio.run(watch.guard(client()))
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)


def test_guard_returns_the_body_s_result_and_passes_its_own_errors(tmp_path: Path) -> None:
    watch = Watch(interval_s=0.05)
    child = watch.start("sleeper", _python(SLEEPS), log=tmp_path / "sleeper.log")

    async def answer() -> int:
        await asyncio.sleep(0.1)
        return 42

    async def fails() -> None:
        raise ValueError("a bug of the body's own")

    try:
        assert asyncio.run(watch.guard(answer())) == 42
        with pytest.raises(ValueError, match="own"):
            asyncio.run(watch.guard(fails()))
    finally:
        watch.stop(child, timeout_s=5)


def test_a_detached_process_is_watched_by_its_pid(tmp_path: Path) -> None:
    """A server that runs detached (PostgreSQL's postmaster): no exit code, still seen."""
    log = tmp_path / "postgres.log"
    log.write_text("FATAL:  could not write to file: No space left on device\n")
    pid = int(
        subprocess.run(
            ["sh", "-c", "sleep 0.3 >/dev/null 2>&1 & echo $!"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    watch = Watch(Child("PostgreSQL", pid, log))
    watch.check()  # still running
    with pytest.raises(ChildExited) as raised:
        watch.wait_until(lambda: False, timeout_s=30, waiting_for="never")
    assert raised.value.code is None
    assert str(raised.value) == (
        f"PostgreSQL exited (log {log}); its last lines:\n"
        "    FATAL:  could not write to file: No space left on device"
    )


def test_last_lines_of_a_missing_or_blank_log(tmp_path: Path) -> None:
    assert last_lines(tmp_path / "none.log") == []
    blank = tmp_path / "blank.log"
    blank.write_text("\n\n  \n")
    assert last_lines(blank) == []
    assert "writing nothing" in str(ChildExited("worker", 1, blank, []))
    big = tmp_path / "big.log"
    big.write_text("".join(f"line {n} " + "x" * 100 + "\n" for n in range(5000)))
    assert last_lines(big, 3) == [f"line {n} " + "x" * 100 for n in (4997, 4998, 4999)]


# A run as the benchmarks are written: it starts a child, and stops it in `finally`.
RUN = (
    "import sys, time\n"
    "from pathlib import Path\n"
    "from pipeline.ops.watch import Watch, terminate_as_interrupt\n"
    "if sys.argv[1] == 'on': terminate_as_interrupt()\n"
    "watch = Watch()\n"
    "child = watch.start('sleeper', [sys.executable, '-c', 'import time; time.sleep(60)'],"
    " log=Path(sys.argv[2]))\n"
    "try:\n"
    "    print(child.pid, flush=True)  # in the try: a signal after it reaches the finally\n"
    "    time.sleep(60)\n"
    "finally:\n"
    "    watch.stop(child, timeout_s=5)\n"
)


@pytest.mark.parametrize("handled", [True, False], ids=["terminate_as_interrupt", "default"])
def test_a_run_stopped_with_sigterm_stops_the_processes_it_started(
    tmp_path: Path, handled: bool
) -> None:
    run = subprocess.Popen(
        [*_python(RUN), "on" if handled else "off", str(tmp_path / "sleeper.log")],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert run.stdout is not None
    pid = int(run.stdout.readline())
    try:
        run.terminate()
        run.wait(10)
        deadline = time.monotonic() + 10
        while handled and Child("sleeper", pid).running() and time.monotonic() < deadline:
            time.sleep(0.05)
        # Without the handler, SIGTERM ends the run at once and the child goes on.
        assert Child("sleeper", pid).running() is not handled
    finally:
        if Child("sleeper", pid).running():
            os.kill(pid, signal.SIGKILL)
