"""The benchmarks and the embedded servers watch the processes they start: one that exits
stops the run at once, with its last log lines, rather than after a time-out."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.ops import demo
from pipeline.ops.embedded import EmbeddedNats, EmbeddedPostgres
from pipeline.ops.watch import ChildExited

from ..conftest import PG_DB, PG_HOST, wait_until

ROOT = Path(__file__).resolve().parents[2]
SMALL_RUN = ["--format", "onnx", "--frames", "8", "--raw-batches", "1", "--imgsz", "64"]


def test_an_embedded_nats_server_that_refuses_its_configuration_says_why(
    tmp_path: Path,
) -> None:
    server = EmbeddedNats(tmp_path, max_payload="lots")
    started = time.monotonic()
    with pytest.raises(ChildExited) as raised:
        server.start(timeout_s=30)
    assert time.monotonic() - started < 5
    assert raised.value.code == 1
    assert "nats-server.conf:2" in raised.value.lines[-1]  # the line of max_payload


def test_an_embedded_nats_server_left_running_on_its_folder_is_stopped_first(
    tmp_path: Path,
) -> None:
    """A demo killed with kill -9 cannot stop its nats-server. The next start on the same
    folder stops that one (two servers must never share a JetStream store) and runs."""
    left = EmbeddedNats(tmp_path / "nats")
    left.start()
    process = left.watched().process
    assert isinstance(process, subprocess.Popen)
    server = EmbeddedNats(tmp_path / "nats")
    try:
        server.start()
        assert process.wait(15) == 0  # stopped gracefully (SIGTERM), not killed
        assert int(server.pid_file.read_text()) == server.watched().pid
        assert server.watched().running()
    finally:
        server.stop()
        if process.poll() is None:
            process.kill()


def test_a_pid_file_naming_another_process_is_left_alone(tmp_path: Path) -> None:
    """The pid a server wrote may belong to another process by now: not stopped."""
    other = subprocess.Popen(["sleep", "60"])
    server = EmbeddedNats(tmp_path / "nats")
    server.data_dir.mkdir(parents=True)
    server.pid_file.write_text(f"{other.pid}\n")
    try:
        server.start()
        assert other.poll() is None
    finally:
        server.stop()
        other.kill()
        other.wait()


@pytest.mark.timeout(120)
def test_an_embedded_postgres_left_by_a_killed_run_is_stopped_by_the_next(
    tmp_path: Path,
) -> None:
    """A run killed with kill -9 leaves its PostgreSQL running; the next run on the folder
    takes it over, and stops it when it ends, as it stops one it started."""
    starter = (
        "import sys, time\n"
        "from pathlib import Path\n"
        "from pipeline.ops.embedded import EmbeddedPostgres\n"
        "EmbeddedPostgres(Path(sys.argv[1])).start()\n"
        "print('up', flush=True)\n"
        "time.sleep(600)\n"
    )
    run = subprocess.Popen(
        [sys.executable, "-c", starter, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert run.stdout is not None and run.stdout.readline().strip() == "up"
    finally:
        run.kill()  # kill -9: it cannot stop its server
        run.wait()
    postgres = EmbeddedPostgres(tmp_path)
    postgres.start()
    left = postgres.watched()
    try:
        assert left.running()
        postgres.stop()
        deadline = time.monotonic() + 30
        while left.running() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not left.running(), "the server left running by the killed run still runs"
    finally:
        if left.running():
            os.kill(left.pid, signal.SIGINT)  # fast shutdown, not to outlive the test


@pytest.mark.timeout(300)
def test_bench_frames_stops_with_the_worker_s_error_when_the_worker_refuses_to_start(
    nats_with_max_payload: Callable[[str], EmbeddedNats], tmp_path: Path
) -> None:
    """bench/frames.py against a NATS whose max_payload (1 MB) is below a frame's limit:
    the worker refuses at once, and the benchmark stops with its configuration error,
    not with `TimeoutError: only 0 of 8 events committed` 600 s later."""
    server = nats_with_max_payload("1MB")
    env = {
        **os.environ,
        "PIPELINE_NATS_URL": server.url,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "YOLO_CONFIG_DIR": str(tmp_path / "yolo"),
    }
    started = time.monotonic()
    run = subprocess.run(
        [sys.executable, "bench/frames.py", *SMALL_RUN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
    )
    elapsed = time.monotonic() - started
    output = run.stdout + run.stderr
    assert run.returncode != 0, output[-3000:]
    assert "`pipeline run worker` exited with code 2" in run.stderr, output[-3000:]
    assert "configuration error: PIPELINE_MAX_FRAME_BYTES" in run.stderr, output[-3000:]
    assert f"the NATS server at {server.url} takes messages of at most" in run.stderr
    assert "TimeoutError" not in output
    assert elapsed < 240, f"took {elapsed:.0f} s"


async def test_the_demo_stops_with_the_server_s_exit_when_its_nats_server_dies(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    servers: list[EmbeddedNats] = []

    class Recorded(EmbeddedNats):
        def start(self, timeout_s: float = 10.0) -> str:
            servers.append(self)
            return super().start(timeout_s)

    monkeypatch.setattr(demo, "EmbeddedNats", Recorded)
    lines: list[str] = []
    stop = asyncio.Event()
    running = asyncio.create_task(
        demo.run_demo(
            tmp_path / "demo", rate=50, duration_s=None, stop=stop, cameras=0, say=lines.append
        )
    )
    try:
        await wait_until(
            lambda: running.done() or any(line.startswith("published") for line in lines), 120
        )
        assert not running.done(), lines
        servers[0].kill()  # as a crash would
        killed = time.monotonic()
        with pytest.raises(ChildExited) as raised:
            await asyncio.wait_for(running, timeout=60)
    finally:
        stop.set()
        if not running.done():
            await asyncio.wait_for(running, timeout=60)
    assert time.monotonic() - killed < 30  # the parts' own stop (the API's, the views') included
    assert raised.value.name == "nats-server"
    assert raised.value.log == tmp_path / "demo" / "nats" / "nats-server.log"
    assert not (tmp_path / "demo" / "demo.env").exists()
