"""Redis as an optional cache, and the event store going away and coming back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from pipeline.app import Worker
from pipeline.errors import Reason
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from pipeline.ops.simulate import Expect, Outgoing, Traffic, publish
from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from ..conftest import REDIS_URL, make_settings, wait_until
from .helpers import stored_ids, stored_rows


def _duplicates(worker: Worker, found_in: str) -> float:
    value = worker.metrics.registry.get_sample_value(
        "pipeline_duplicates_total", {"domain": "security", "found_in": found_in}
    )
    return value or 0.0


@pytest.mark.parametrize("redis", ["up", "down"])
async def test_redis_is_only_a_cache(
    redis: str, nats_server: EmbeddedNats, pg_schema: str, nc: Client
) -> None:
    url = REDIS_URL if redis == "up" else f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(nats_server.url, pg_schema, redis_url=url, namespace="r" + redis)
    async with Worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=5)
        sent = [traffic.valid(Domain.SECURITY) for _ in range(100)]
        for out in sent:
            await js.publish(out.subject, out.body, headers={"Nats-Msg-Id": str(uuid.uuid4())})
        await wait_until(lambda: len(stored_rows(pg_schema)) == 100)
        for out in sent:  # redelivered copies, past JetStream's duplicate window
            await js.publish(out.subject, out.body, headers={"Nats-Msg-Id": str(uuid.uuid4())})
        await wait_until(lambda: _duplicates(worker, "cache") + _duplicates(worker, "store") == 100)

        if redis == "up":
            assert _duplicates(worker, "cache") == 100
            assert worker.metrics.total("pipeline_dedup_cache_errors") == 0
        else:
            assert _duplicates(worker, "store") == 100
            assert worker.metrics.total("pipeline_dedup_cache_errors") >= 1

    counts = stored_ids(pg_schema)
    assert len(counts) == 100
    assert set(counts.values()) == {1}


@pytest.fixture
def embedded_pg(tmp_path: Path) -> Iterator[EmbeddedPostgres]:
    """A PostgreSQL server the test may stop and start."""
    server = EmbeddedPostgres(tmp_path)
    yield server
    server.stop()


def _pg_settings(nats_url: str, server: EmbeddedPostgres, **overrides: object) -> Settings:
    address = server.start()
    return make_settings(
        nats_url,
        "public",
        postgres_host=address.host,
        postgres_port=address.port,
        postgres_dbname=address.dbname,
        postgres_connect_timeout_s=1.0,
        **overrides,
    )


async def _count(worker: Worker) -> int:
    assert worker.store is not None
    try:
        return worker.store.count()
    except Exception:
        return -1


async def test_database_down_naks_then_stores_everything_once_it_is_back(
    nats_server: EmbeddedNats, embedded_pg: EmbeddedPostgres, nc: Client
) -> None:
    settings = _pg_settings(nats_server.url, embedded_pg, max_deliver=50)
    async with Worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=6)
        sent = [traffic.valid(Domain.SECURITY) for _ in range(20)]
        embedded_pg.stop()
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: worker.metrics.total("pipeline_retries") >= 20, timeout_s=30)
        embedded_pg.start()

        async def all_stored() -> bool:
            return await _count(worker) == 20

        await wait_until(all_stored, timeout_s=60)
        assert worker.metrics.total("pipeline_dead_lettered") == 0


async def test_database_down_past_max_deliver_dead_letters_with_the_error(
    nats_server: EmbeddedNats, embedded_pg: EmbeddedPostgres, nc: Client
) -> None:
    # A long ack wait: only the naks after failed commits count deliveries here, never a
    # redelivery because a slow machine held a batch past the ack wait.
    settings = _pg_settings(nats_server.url, embedded_pg, max_deliver=2, ack_wait_s=60.0)
    async with Worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=7)
        sent = [traffic.valid(Domain.SECURITY) for _ in range(5)]
        embedded_pg.stop()
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        letters = DeadLetters(js, worker.subjects)

        async def all_dead_lettered() -> bool:
            return len(await letters.list()) == 5

        await wait_until(all_dead_lettered, timeout_s=60)
        found = await letters.list()
        assert {letter.reason for letter in found} == {Reason.RETRIES_EXHAUSTED}
        assert all(letter.delivered == 2 for letter in found)
        assert {letter.body for letter in found} == {o.body for o in sent}

        # Once the database is back, requeued dead letters are stored.
        embedded_pg.start()
        for letter in found:
            assert letter.dlq_seq is not None
            await letters.requeue(letter.dlq_seq)

        async def all_stored() -> bool:
            return await _count(worker) == 5

        await wait_until(all_stored, timeout_s=60)
        assert await letters.list() == []


async def test_nats_restarting_mid_stream_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, pg_schema: str
) -> None:
    settings = make_settings(nats_server.url, pg_schema)
    traffic = Traffic(Subjects(), seed=13, bad_ratio=0.0)
    ledger: list[Outgoing] = []
    async with Worker(settings) as worker:
        for _ in range(2):
            nc = await nats.connect(nats_server.url)
            await publish(nc.jetstream(), iter(traffic), count=3000, on_published=ledger.append)
            await nc.close()
            await wait_until(lambda: len(stored_rows(pg_schema)) > 1000, timeout_s=30)
            nats_server.kill()  # SIGKILL while the worker is consuming
            await asyncio.sleep(1.0)
            nats_server.start()
        unique = {(o.domain, o.message_id) for o in ledger if o.expect is Expect.STORE}
        # The counter moves just after the commit: wait for it, then read the store.
        await wait_until(
            lambda: worker.metrics.total("pipeline_events_stored") == len(unique), timeout_s=90
        )
        assert len(stored_rows(pg_schema)) == len(unique)
    counts = stored_ids(pg_schema)
    assert set(counts.values()) == {1}
