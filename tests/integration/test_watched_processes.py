"""The benchmarks and the embedded servers watch the processes they start: one that exits
stops the run at once, with its last log lines, rather than after a time-out."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from pipeline.ops import demo
from pipeline.ops.embedded import EmbeddedNats
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
