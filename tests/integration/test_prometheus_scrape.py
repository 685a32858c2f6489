"""A real Prometheus scrapes each of the pipeline's own targets, as the shipped config does."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.api.server import run_api
from pipeline.metrics import Metrics, ProjectionMetrics, serve_metrics
from pipeline.ops.embedded import free_port
from pipeline.ops.supervisor import metrics_ports

from ..conftest import make_settings

PROMETHEUS_DIR = Path(__file__).parents[2] / "deploy" / "prometheus"
SCRAPE_TIMEOUT_S = 25.0


def _prometheus() -> str:
    found = shutil.which("prometheus") or (
        "/usr/bin/prometheus" if Path("/usr/bin/prometheus").exists() else None
    )
    if found is None:
        if os.environ.get("PIPELINE_TESTS_REQUIRE_PROMTOOL"):
            pytest.fail("prometheus is missing (Debian: apt-get install prometheus)")
        pytest.skip("prometheus is not installed (Debian: apt-get install prometheus)")
    return found


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return json.loads(answer.read())


def _content_type(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as answer:
        return str(answer.headers["Content-Type"])


def _query(base: str, promql: str) -> list[dict[str, Any]]:
    found = _get(f"{base}/api/v1/query?query={urllib.parse.quote(promql)}")
    assert found["status"] == "success", found
    result: list[dict[str, Any]] = found["data"]["result"]
    return result


def _config(ports: dict[str, list[int]]) -> dict[str, Any]:
    """The shipped configuration, its pipeline jobs pointed at this test's processes."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    jobs = [job for job in config["scrape_configs"] if job["job_name"] in ports]
    assert {job["job_name"] for job in jobs} == set(ports)
    for job in jobs:
        [static] = job["static_configs"]
        assert len(static["targets"]) == len(ports[job["job_name"]]), job
        static["targets"] = [f"127.0.0.1:{port}" for port in ports[job["job_name"]]]
    config["scrape_configs"] = jobs  # NATS's exporter is not installable here
    return config


@contextlib.contextmanager
def _running_prometheus(tmp_path: Path, config: dict[str, Any]) -> Iterator[str]:
    """A Prometheus on `config` (Debian's package), until the block ends; yields its URL."""
    binary = _prometheus()
    port = free_port()
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config))
    with (tmp_path / "prometheus.log").open("wb") as log:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={tmp_path / 'prometheus.yml'}",
                f"--storage.tsdb.path={tmp_path / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=log,
            stderr=log,
        )
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.terminate()
        process.wait(timeout=10)


def _worker_ports() -> list[int]:
    """Free ports for two worker processes, numbered as the supervisor numbers them."""
    while True:
        settings = make_settings("nats://127.0.0.1:1", "public", metrics_port=free_port())
        ports = metrics_ports(settings.model_copy(update={"processes": 2}))
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", ports[1]))
            except OSError:
                continue
        return ports


async def test_each_pipeline_target_serves_prometheus_text_to_prometheus(tmp_path: Path) -> None:
    worker_ports = _worker_ports()
    projections_port, api_port = free_port(), free_port()
    projection_metrics = ProjectionMetrics()
    projection_metrics.position.labels(view="security").set(7)
    servers = [serve_metrics(Metrics(), "127.0.0.1", port) for port in worker_ports]
    servers.append(serve_metrics(projection_metrics, "127.0.0.1", projections_port))
    settings = make_settings("nats://127.0.0.1:1", "public", api_port=api_port)
    stop, started = asyncio.Event(), asyncio.Event()
    api = asyncio.create_task(run_api(settings, stop, started))
    ports = {
        "pipeline-worker": worker_ports,
        "pipeline-projections": [projections_port],
        "pipeline-api": [api_port],
    }
    known = {  # a series each kind of process exports once it serves
        "pipeline-worker": "pipeline_dedup_cache_errors_total",
        "pipeline-projections": 'pipeline_projection_position{view="security"}',
        "pipeline-api": 'pipeline_api_requests_total{route="/healthz"}',
    }
    expected = {f"127.0.0.1:{port}": job for job, numbers in ports.items() for port in numbers}
    try:
        await asyncio.wait_for(started.wait(), 20)
        await asyncio.to_thread(urllib.request.urlopen, f"http://127.0.0.1:{api_port}/healthz")
        for instance in expected:  # Prometheus 3 (compose's) refuses a scrape without one
            kind = await asyncio.to_thread(_content_type, f"http://{instance}/metrics")
            assert kind.startswith("text/plain; version=0.0.4"), (instance, kind)
        with _running_prometheus(tmp_path, _config(ports)) as base:
            up, known_from = await asyncio.to_thread(_scraped, base, set(expected), known)
            assert up == dict.fromkeys(expected, 1.0), _targets(base)
            assert known_from == expected, _targets(base)
            rules = (await asyncio.to_thread(_get, f"{base}/api/v1/rules"))["data"]["groups"]
            assert [group["name"] for group in rules] == ["pipeline"]
            assert all(rule["health"] == "ok" for group in rules for rule in group["rules"])
    finally:
        stop.set()
        await api
        for server in servers:
            server.shutdown()
            server.server_close()


def _scraped(
    base: str, instances: set[str], known: dict[str, str]
) -> tuple[dict[str, float], dict[str, str]]:
    """`up` by instance, and the job whose known series came from each instance, once every
    instance answered (or after `SCRAPE_TIMEOUT_S`)."""
    deadline = time.monotonic() + SCRAPE_TIMEOUT_S
    up: dict[str, float] = {}
    known_from: dict[str, str] = {}
    while time.monotonic() < deadline:
        try:
            up = {r["metric"]["instance"]: float(r["value"][1]) for r in _query(base, "up")}
            known_from = {
                r["metric"]["instance"]: r["metric"]["job"]
                for series in known.values()
                for r in _query(base, series)
            }
        except (urllib.error.URLError, ConnectionError):
            pass  # not listening yet
        if set(up) == instances and all(up.values()) and set(known_from) == instances:
            break
        time.sleep(0.3)
    return up, known_from


def _targets(base: str) -> list[dict[str, Any]]:
    """Each target's health and last scrape error, for a failure's message."""
    active = _get(f"{base}/api/v1/targets")["data"]["activeTargets"]
    return [{k: t.get(k) for k in ("scrapeUrl", "health", "lastError")} for t in active]
