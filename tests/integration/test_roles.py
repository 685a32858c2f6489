"""The store's roles, as `pipeline db migrate` makes them: PostgreSQL itself refuses each
role every statement beyond its part."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import stored_events
from pipeline.store.eventstore import EventStore
from projections.service import ProjectionService

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, wait_until
from .helpers import views_current

INSERT = (
    'INSERT INTO "{s}".journal_events (originator_id, originator_version, topic, state) '
    "VALUES ('{id}', 1, 'x', '\\x7b7d')"
)
FUNCTION = (
    'SELECT * FROM "{s}".journal_events_insert_new('
    "'\\x00'::bytea, '{{}}', '{{}}', '{{}}', '\\x00'::bytea, '{{}}', '{{}}', '{{}}')"
)
ON_EVENTS = [
    INSERT,
    'UPDATE "{s}".journal_events SET topic = topic',
    'DELETE FROM "{s}".journal_events',
    'TRUNCATE "{s}".journal_events',
    'ALTER TABLE "{s}".journal_events ADD COLUMN x int',
    'DROP TABLE "{s}".journal_events',
    'DROP FUNCTION "{s}".journal_events_insert_new',
]
"""What no runtime role may do to the event table and its function."""
ON_VIEWS = [
    "INSERT INTO \"{s}\".security_counts VALUES (now(), 'high', 'z', 1)",
    'UPDATE "{s}".security_events SET zone = zone',
    'DELETE FROM "{s}".security_events',
    'TRUNCATE "{s}".metric_rollups',
    'DELETE FROM "{s}".projection_positions',
    'DROP TABLE "{s}".security_events',
]
"""What only the projector may do to the views."""
DDL = ['CREATE TABLE "{s}".mine (x int)', 'CREATE SCHEMA "mine_{u}"']


def _refused(user: str, schema: str, statements: list[str]) -> None:
    for statement in statements:
        sql = statement.format(s=schema, id=uuid.uuid4(), u=uuid.uuid4().hex[:8])
        with (
            psycopg.connect(host=PG_HOST, dbname=PG_DB, user=user, autocommit=True) as conn,
            pytest.raises(errors.InsufficientPrivilege),
        ):
            conn.execute(sql)


def _allowed(user: str, schema: str, statements: list[str]) -> None:
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user=user, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement.format(s=schema))


@pytest.fixture
def views(pg_schema: str) -> str:
    """The schema with events and every view made (by the projector)."""
    settings = make_settings("nats://unused", pg_schema, projections_poll_s=0.1)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    store.write(list(stored_events(40, seed=9, cameras=1)))
    store.close()
    service = ProjectionService(as_role(settings, "projector"))
    service.start()
    try:
        asyncio.run(wait_until(lambda: views_current(pg_schema), timeout_s=30))
    finally:
        service.stop()
    return pg_schema


def test_the_writer_inserts_through_the_function_and_nothing_else(views: str) -> None:
    _allowed("pipeline_writer", views, ['SELECT count(*) FROM "{s}".journal_events'])
    _refused("pipeline_writer", views, [*ON_EVENTS, *ON_VIEWS, *DDL])
    _refused("pipeline_writer", views, ['SELECT * FROM "{s}".security_events'])


def test_the_projector_keeps_the_views_and_writes_no_event(views: str) -> None:
    _allowed(
        "pipeline_projector",
        views,
        [
            'SELECT count(*) FROM "{s}".journal_events',
            'UPDATE "{s}".security_events SET zone = zone',
            'CREATE TABLE "{s}".security_events__next (LIKE "{s}".security_events)',
            'DROP TABLE "{s}".security_events__next',
        ],
    )
    _refused("pipeline_projector", views, [*ON_EVENTS, FUNCTION])


def test_the_api_reads_and_records_a_skip_only(views: str) -> None:
    _allowed(
        "pipeline_api",
        views,
        [
            'SELECT count(*) FROM "{s}".journal_events',
            'SELECT count(*) FROM "{s}".security_events',
            'SELECT count(*) FROM "{s}".metric_rollups',
            'UPDATE "{s}".projection_positions SET state = state',
        ],
    )
    _refused("pipeline_api", views, [*ON_EVENTS, FUNCTION, *ON_VIEWS, *DDL])


def test_the_auditor_reads_the_events_only(views: str) -> None:
    _allowed("pipeline_auditor", views, ['SELECT count(*) FROM "{s}".journal_events'])
    _refused("pipeline_auditor", views, [*ON_EVENTS, FUNCTION, *ON_VIEWS, *DDL])


def test_a_migration_runs_again_and_leaves_the_events_as_they_were(views: str) -> None:
    def count() -> Any:
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
            return conn.execute(f'SELECT count(*) FROM "{views}".journal_events').fetchone()

    before = count()
    migrate(make_settings("nats://unused", views))
    assert count() == before
    settings = make_settings("nats://unused", views)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    try:
        assert store.write(list(stored_events(5, seed=10, cameras=0))).stored
    finally:
        store.close()
