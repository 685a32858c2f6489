"""The detector pool on an existing Ray cluster (`ray start --head`), through `ray://`:
with Ray's token authentication on, and refused, naming both sides' versions, when the
cluster's Python minor or Ray differs from the worker's."""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from pipeline.ops.embedded import free_port

RAY = Path(sys.executable).parent / "ray"

SCRIPT = """
import asyncio, json, sys
import pipeline.detection.raycluster as raycluster
from pipeline.detection.detector import DetectorConfig
from pipeline.detection.frame import Frame
from pipeline.detection.pool import DetectorPool, PoolConfig
from pipeline.detection.raycluster import RayVersions, connect_ray
from pipeline.errors import ConfigError
from pipeline.ops.simulate import Cameras
from streams import Subjects

address, model, token, python = sys.argv[1:5]
if python:  # this process claims another Python (the cluster's is the real one)
    ray_version = raycluster.local_versions().ray
    raycluster.local_versions = lambda: RayVersions(python, ray_version)

async def main() -> None:
    try:
        started = connect_ray(address, auth_token=token, require_auth=True)
    except ConfigError as exc:
        print(json.dumps({"refused": str(exc), "setting": exc.setting}))
        return
    import ray
    pool = DetectorPool(
        DetectorConfig(model=model, imgsz=320, conf=1e-5), PoolConfig(num_cpus=0.5)
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


@dataclass(frozen=True)
class RayHead:
    """A Ray head with token authentication on: its client port and its token."""

    client_port: int
    token: str
    home: Path
    """A home folder without a token file (~/.ray/auth_token) for the clients."""


@pytest.fixture(scope="module")
def ray_head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RayHead]:
    """A Ray head started with `ray start --block` in a process group of its own, its
    token given in RAY_AUTH_TOKEN (as the compose file and the chart give it from a
    secret)."""
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
    token = secrets.token_hex(32)
    home = tmp_path_factory.mktemp("home")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "HOME": str(home)}
    head = subprocess.Popen(
        args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    try:
        yield RayHead(client_port, token, home)
    finally:
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(5)
        except subprocess.TimeoutExpired:  # a test's head: nothing of it is kept
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()


def _run(head: RayHead, model: Path, *, token: str, python: str = "") -> dict[str, object]:
    """The script as a worker would run it, in an environment without Ray settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(head.home)
    address = f"ray://127.0.0.1:{head.client_port}"
    deadline = time.monotonic() + 90
    while True:  # the head takes a few seconds to accept clients
        run = subprocess.run(
            [sys.executable, "-c", SCRIPT, address, str(model), token, python],
            capture_output=True,
            text=True,
            timeout=180,
            env=env,
        )
        if run.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert run.returncode == 0, run.stderr[-3000:]
    result: dict[str, object] = json.loads(run.stdout.strip().splitlines()[-1])
    return result


def test_the_pool_runs_on_an_existing_cluster_with_its_token(
    ray_head: RayHead, model_dir: Path
) -> None:
    result = _run(ray_head, model_dir / "yolov8n.onnx", token=ray_head.token)
    assert result == {"started": True, "cpus": 1.0, "analysed": 4}


def test_a_client_without_the_token_is_refused(ray_head: RayHead) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["HOME"] = str(ray_head.home)
    # One attempt: a refused client tries again 1, 6 and 11 s later by default.
    code = (
        "import ray, sys; ray.util.connect(sys.argv[1], connection_retries=1); "
        "print(ray.cluster_resources())"
    )

    def client(**extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-c", code, f"127.0.0.1:{ray_head.client_port}"],
            capture_output=True,
            text=True,
            timeout=120,
            env={**env, **extra, "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "2"},
        )

    deadline = time.monotonic() + 90
    while (up := client(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=ray_head.token)).returncode:
        assert time.monotonic() < deadline, up.stderr[-3000:]  # the head takes a few seconds
        time.sleep(2)
    assert "CPU" in up.stdout
    for name, extra in (
        ("a wrong token", {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}),
        ("no token", {"RAY_AUTH_MODE": "disabled"}),
    ):
        run = client(**extra)
        assert run.returncode != 0, f"a client with {name} reached the cluster: {run.stdout}"
        assert "CPU" not in run.stdout


def test_a_cluster_of_another_python_is_refused_naming_both(
    ray_head: RayHead, model_dir: Path
) -> None:
    import ray

    cluster = ".".join(map(str, sys.version_info[:2]))
    result = _run(ray_head, model_dir / "yolov8n.onnx", token=ray_head.token, python="3.99.0")
    assert result["setting"] == "PIPELINE_RAY_ADDRESS"
    message = str(result["refused"])
    assert f"runs Python {cluster}." in message and f"Ray {ray.__version__}" in message
    assert "this worker Python 3.99.0" in message
