"""Integration tests talk to real servers; mark them all."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.ops.embedded import EmbeddedPostgres
from pipeline.settings import Settings

from ..servers import Servers


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/integration" in str(item.fspath):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session", autouse=True)
def _servers_up(test_servers: Servers) -> None:
    """Every integration test may reach PostgreSQL and Redis (started here where needed)."""


@pytest.fixture
def embedded_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server the test may stop and start."""
    server = EmbeddedPostgres(tmp_path)
    yield server
    server.stop()


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch, settings: Settings) -> Settings:
    """Point the CLI (which reads PIPELINE_* variables) at the test's servers."""
    monkeypatch.setenv("PIPELINE_NATS_URL", settings.nats_url)
    monkeypatch.setenv("PIPELINE_POSTGRES_HOST", settings.postgres_host)
    monkeypatch.setenv("PIPELINE_POSTGRES_PORT", str(settings.postgres_port))
    monkeypatch.setenv("PIPELINE_POSTGRES_DBNAME", settings.postgres_dbname)
    monkeypatch.setenv("PIPELINE_POSTGRES_SCHEMA", settings.postgres_schema)
    monkeypatch.chdir(Path(__file__).parent)  # no stray .env file
    return settings
