"""The detector pool on an existing Ray cluster (`ray start --head`), through `ray://`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.ops.embedded import free_port

RAY = Path(sys.executable).parent / "ray"

SCRIPT = """
import asyncio, json, sys
from pipeline.detection.detector import DetectorConfig
from pipeline.detection.pool import DetectorPool, Frame, PoolConfig, connect_ray
from pipeline.ops.simulate import Cameras
from streams import Subjects

async def main() -> None:
    started = connect_ray(sys.argv[1])
    import ray
    pool = DetectorPool(
        DetectorConfig(model=sys.argv[2], imgsz=320, conf=1e-5), PoolConfig(num_cpus=0.5)
    )
    await pool.start()
    cameras = Cameras(Subjects(""), width=320, height=240, variants=2, seed=1)
    out = await pool.detect([Frame(cameras.frame().body, 320, 240) for _ in range(4)])
    await pool.stop()
    print(json.dumps({
        "started": started,
        "cpus": ray.cluster_resources().get("CPU"),
        "analysed": sum(1 for o in out if o.detections),
    }))

asyncio.run(main())
"""


@pytest.fixture
def ray_head() -> Iterator[int]:
    """A Ray head started with `ray start --block` in a process group of its own."""
    client_port = free_port()
    temp = tempfile.mkdtemp(prefix="rayh-", dir="/tmp")  # socket paths must stay short
    ports = {
        "--port": free_port(),
        "--ray-client-server-port": client_port,
        "--node-manager-port": free_port(),
        "--object-manager-port": free_port(),
        "--dashboard-agent-listen-port": free_port(),
        "--dashboard-agent-grpc-port": free_port(),
        "--metrics-export-port": free_port(),
        "--runtime-env-agent-port": free_port(),
    }
    args = [str(RAY), "start", "--head", "--block", "--num-cpus", "1"]
    args += ["--include-dashboard", "false", "--temp-dir", temp]
    for flag, port in ports.items():
        args += [flag, str(port)]
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield client_port
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)


def test_the_pool_runs_on_an_existing_cluster(ray_head: int, model_dir: Path) -> None:
    deadline = time.monotonic() + 90
    while True:  # the head takes a few seconds to accept clients
        run = subprocess.run(
            [
                sys.executable,
                "-c",
                SCRIPT,
                f"ray://127.0.0.1:{ray_head}",
                str(model_dir / "yolov8n.onnx"),
            ],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if run.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result == {"started": True, "cpus": 1.0, "analysed": 4}
