"""The Redis cache of stored ids is a hint: a cache from another or an older database is
never believed, so replayed messages are stored again where the store lacks them."""

from __future__ import annotations

import uuid

import psycopg
from nats.aio.client import Client

from pipeline.app import Worker
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.simulate import Outgoing, Traffic
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, REDIS_URL, make_settings, running_worker, wait_until
from .helpers import ids_of, stored_ids


def _sql(statement: str) -> None:
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        conn.execute(statement)


async def _replay(nc: Client, messages: list[Outgoing]) -> None:
    """Publish again, with new transport ids: past JetStream's duplicate window."""
    js = nc.jetstream()
    for out in messages:
        await js.publish(out.subject, out.body, headers={"Nats-Msg-Id": str(uuid.uuid4())})


def _stale(worker: Worker) -> float:
    return worker.metrics.total("pipeline_dedup_cache_stale")


async def test_a_restored_or_replaced_database_gets_every_replayed_message(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client
) -> None:
    namespace = f"c{uuid.uuid4().hex[:8]}"  # a key space of its own in the shared Redis
    settings = make_settings(nats_server.url, pg_schema, redis_url=REDIS_URL, namespace=namespace)
    table = f'"{pg_schema}".journal_events'
    async with running_worker(settings) as worker:
        traffic = Traffic(worker.subjects, seed=31)
        first = [traffic.valid(Domain.SECURITY) for _ in range(30)]
        second = [traffic.valid(Domain.METRICS) for _ in range(30)]
        everything = ids_of(Domain.SECURITY, [o.message_id for o in first]) | ids_of(
            Domain.METRICS, [o.message_id for o in second]
        )
        await _replay(nc, first)
        await wait_until(lambda: len(stored_ids(pg_schema)) == 30)
        _sql(f'CREATE TABLE "{pg_schema}".backup AS SELECT * FROM {table}')
        await _replay(nc, second)
        await wait_until(lambda: len(stored_ids(pg_schema)) == 60)

        # An earlier copy of itself: the second half is in the cache, not in the store.
        _sql(f'TRUNCATE {table}; INSERT INTO {table} SELECT * FROM "{pg_schema}".backup')
        await _replay(nc, first + second)
        await wait_until(lambda: set(stored_ids(pg_schema)) == everything)
        await wait_until(lambda: _stale(worker) == 30)

        # An empty database: nothing the cache says is there.
        _sql(f"TRUNCATE {table}")
        await _replay(nc, first + second)
        await wait_until(lambda: set(stored_ids(pg_schema)) == everything)
        await wait_until(lambda: _stale(worker) == 90)
        assert worker.metrics.total("pipeline_dead_lettered") == 0
    assert set(stored_ids(pg_schema).values()) == {1}
