"""Redis as an optional cache, and the event store going away and coming back."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass

import nats
import psycopg
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import ConsumerInfo

from pipeline.app import Worker, apply_streams
from pipeline.errors import Reason
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ingest.intake import delivery_info
from pipeline.ops.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import Expect, Outgoing, Traffic, publish
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from schemas import Domain
from streams import Subjects

from ..conftest import PG_DB, PG_HOST, REDIS_URL, make_settings, running_worker, wait_until
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
    async with running_worker(settings) as worker:
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


def _pg_settings(nats_url: str, server: EmbeddedPostgres, **overrides: object) -> Settings:
    """Settings on a PostgreSQL the test may stop, migrated by its superuser."""
    address = server.start()
    settings = make_settings(
        nats_url,
        "public",
        postgres_host=address.host,
        postgres_port=address.port,
        postgres_dbname=address.dbname,
        postgres_connect_timeout_s=1.0,
        **overrides,
    )
    migrate(settings)
    return settings


async def _count(worker: Worker) -> int:
    assert worker.store is not None
    try:
        return worker.store.count()
    except Exception:
        return -1


def _paused(worker: Worker, cause: str) -> float:
    """How many domains are paused for `cause` right now."""
    return sum(
        worker.metrics.registry.get_sample_value(
            "pipeline_intake_paused", {"domain": d.value, "cause": cause}
        )
        or 0.0
        for d in worker.settings.domains
    )


@dataclass(frozen=True)
class _Settle:
    """An ack, nak or in-progress mark as the server received it."""

    reply: str
    """The ack subject of the delivery it settles (`delivery_info` reads it)."""
    body: bytes
    """`+ACK`, `-NAK`, `+WPI` (in progress), `+TERM`."""


async def _watch_settles(nc: Client) -> list[_Settle]:
    """Every ack, nak and in-progress mark any client sends from now on, in order."""
    seen: list[_Settle] = []

    async def record(msg: Msg) -> None:
        seen.append(_Settle(msg.subject, msg.data))

    await nc.subscribe("$JS.ACK.>", cb=record)  # JetStream's ack subjects, not the pipeline's
    return seen


async def _consumers(nc: Client, worker: Worker) -> list[ConsumerInfo]:
    """The server's view of each domain's consumer."""
    jsm, subjects = nc.jsm(), worker.subjects
    return [
        await jsm.consumer_info(subjects.stream(d), subjects.durable(d))
        for d in worker.settings.domains
    ]


DEFAULT_DELIVERY = {
    "ack_wait_s": Settings.model_fields["ack_wait_s"].default,
    "max_deliver": Settings.model_fields["max_deliver"].default,
    "retry_backoff_s": Settings.model_fields["retry_backoff_s"].default,
}
"""The delivery settings a deployment runs with (the test settings shorten them)."""


async def test_postgres_down_past_every_delivery_under_traffic_dead_letters_only_the_invalid(
    nats_server: EmbeddedNats, embedded_pg: EmbeddedPostgres, nc: Client
) -> None:
    """The outage outlasts `max_deliver` x `ack_wait`: held messages use up no delivery, no
    valid message is dead-lettered, each invalid one is (with its reason), none is lost."""
    settings = _pg_settings(nats_server.url, embedded_pg, **DEFAULT_DELIVERY)
    assert (settings.max_deliver, settings.ack_wait_s) == (5, 30.0)
    budget_ns = int(settings.max_deliver * settings.ack_wait_s * 1e9)
    settles = await _watch_settles(nc)
    ledger: list[Outgoing] = []
    async with running_worker(settings) as worker:
        domains = len(worker.settings.domains)
        traffic = Traffic(worker.subjects, seed=21)  # 1 % invalid, 2 % duplicates
        producer = asyncio.create_task(
            publish(nc.jetstream(), iter(traffic), rate=60, on_published=ledger.append)
        )

        async def some_stored() -> bool:
            return await _count(worker) > 100

        await wait_until(some_stored, timeout_s=30)
        embedded_pg.stop()
        await wait_until(lambda: _paused(worker, "store") == domains, timeout_s=60)
        paused_at = len(settles)  # from here on, no domain pulls, acks or naks

        def held_past_every_delivery() -> bool:
            """A first delivery, stored longer ago than all its deliveries would last, is
            still marked in progress: JetStream would have redelivered it meanwhile."""
            now = time.time_ns()
            return any(
                s.body == b"+WPI"
                and delivery_info(s).delivered == 1  # type: ignore[arg-type]
                and now - delivery_info(s).stored_ns > budget_ns  # type: ignore[arg-type]
                for s in settles[paused_at:]
            )

        await wait_until(held_past_every_delivery, timeout_s=budget_ns / 1e9 + 30)
        assert {s.body for s in settles[paused_at:]} == {b"+WPI"}, "nothing acked or nak'd"
        assert [c.num_redelivered for c in await _consumers(nc, worker)] == [0] * domains
        assert any("paused (store)" in line for line in worker.ready())
        assert worker.metrics.total("pipeline_retries") == 0, "an outage uses up no delivery"
        embedded_pg.start()
        await wait_until(lambda: _paused(worker, "store") == 0, timeout_s=60)
        resumed_at = len(ledger)
        await wait_until(lambda: len(ledger) > resumed_at + 60)  # traffic goes on meanwhile
        producer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await producer
        unique = {(o.domain, o.message_id) for o in ledger if o.expect is not Expect.DEAD_LETTER}
        invalid = {o.message_id: o.reason for o in ledger if o.expect is Expect.DEAD_LETTER}

        async def all_stored() -> bool:
            return await _count(worker) == len(unique)

        await wait_until(all_stored, timeout_s=120)
        await wait_until(lambda: worker.metrics.total("pipeline_dead_lettered") == len(invalid))
        await wait_until(lambda: worker.ready() == [])
        letters = await DeadLetters(nc.jetstream(), worker.subjects).list(limit=len(invalid) + 1)
        assert {x.headers["Nats-Msg-Id"]: x.reason.value for x in letters} == invalid
        assert {x.delivered for x in letters} == {1}
        assert worker.metrics.total("pipeline_retries") == 0
        assert [c.num_redelivered for c in await _consumers(nc, worker)] == [0] * domains
        assert worker.store is not None
        # Every message once: as many events as messages, and each message's among them.
        found = worker.store.stored([event_id(d, m) for d, m in unique])
        assert len(found) == len(unique) == await _count(worker)
    assert len(unique) > 60 * budget_ns / 1e9 and len(invalid) > 50


async def test_a_read_only_database_pauses_intake_until_it_takes_writes_again(
    nats_server: EmbeddedNats, embedded_pg: EmbeddedPostgres, nc: Client
) -> None:
    settings = _pg_settings(nats_server.url, embedded_pg, max_deliver=1)
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=22)
        _set_read_only(settings, True)
        sent = [traffic.valid(Domain.SECURITY) for _ in range(20)]
        for out in sent:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: _paused(worker, "store") == 1)
        assert "read-only" in " ".join(worker.pauses.active())
        _set_read_only(settings, False)

        async def all_stored() -> bool:
            return await _count(worker) == 20

        await wait_until(all_stored, timeout_s=60)
        await wait_until(lambda: _paused(worker, "store") == 0)
        assert worker.metrics.total("pipeline_dead_lettered") == 0


def _waiting_for(holder: psycopg.Connection[object]) -> list[object]:
    """When each transaction now waiting for a lock `holder` holds began."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        rows = conn.execute(
            "SELECT xact_start FROM pg_stat_activity WHERE %s = ANY(pg_blocking_pids(pid))",
            (holder.info.backend_pid,),
        ).fetchall()
    return [row[0] for row in rows]


def _set_read_only(settings: Settings, on: bool) -> None:
    """Make the whole server refuse writes (as a standby would), or take them again."""
    with psycopg.connect(
        host=settings.postgres_host,
        port=settings.postgres_port,
        user=settings.postgres_user,
        dbname=settings.postgres_dbname,
        autocommit=True,
    ) as conn:
        conn.execute(f"ALTER SYSTEM SET default_transaction_read_only = {'on' if on else 'off'}")
        conn.execute("SELECT pg_reload_conf()")


async def test_a_lock_wait_past_the_lock_timeout_pauses_and_then_stores(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client
) -> None:
    settings = make_settings(nats_server.url, pg_schema, postgres_lock_timeout_s=1, max_deliver=1)
    async with running_worker(settings) as worker:
        js = nc.jetstream()
        traffic = Traffic(worker.subjects, seed=23)
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as holder:
            holder.execute(f'LOCK TABLE "{pg_schema}".journal_events IN EXCLUSIVE MODE')
            sent = [traffic.valid(Domain.METRICS) for _ in range(10)]
            for out in sent:
                await js.publish(out.subject, out.body, headers=out.headers)
            await wait_until(lambda: _paused(worker, "store") == 1, timeout_s=30)
            assert "lock" in " ".join(worker.pauses.active())
            seen: set[object] = set()

            def a_probe_timed_out() -> bool:
                """A probe's lock wait, seen in PostgreSQL, ended with the lock still held."""
                waiting = set(_waiting_for(holder))
                ended = seen - waiting
                seen.update(waiting)
                return bool(ended)

            await wait_until(a_probe_timed_out, timeout_s=30)
            holder.rollback()
        await wait_until(lambda: len(stored_rows(pg_schema)) == 10, timeout_s=30)
        await wait_until(lambda: _paused(worker, "store") == 0)
        assert worker.metrics.total("pipeline_dead_lettered") == 0
        assert worker.metrics.total("pipeline_retries") == 0


async def test_nats_restarting_mid_stream_loses_and_doubles_nothing(
    nats_server: EmbeddedNats, pg_schema: str
) -> None:
    settings = make_settings(nats_server.url, pg_schema)
    traffic = Traffic(Subjects(), seed=13, bad_ratio=0.0)
    ledger: list[Outgoing] = []
    async with running_worker(settings) as worker:
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


async def test_a_dlq_stream_that_does_not_answer_pauses_the_domain_until_it_is_back(
    settings: Settings, pg_schema: str, nc: Client
) -> None:
    settings = settings.model_copy(update={"max_deliver": 1, "ack_wait_s": 1.0})
    settles = await _watch_settles(nc)
    async with running_worker(settings) as worker:
        js, jsm = nc.jetstream(), nc.jsm()
        await jsm.delete_stream(worker.subjects.dead_letter_stream())  # publishes go unanswered
        traffic = Traffic(worker.subjects, seed=24)
        bad = [traffic.bad("invalid_json") for _ in range(3)]
        for out in bad:
            await js.publish(out.subject, out.body, headers=out.headers)
        await wait_until(lambda: _paused(worker, "dead_letters") >= 1, timeout_s=30)
        assert any("paused (dead_letters)" in line for line in worker.ready())

        def held_past_ack_wait() -> bool:
            """Each message marked in progress 4 times (every ack_wait / 3) on one delivery."""
            marks = [s.reply for s in settles if s.body == b"+WPI"]
            return len(set(marks)) == 3 and all(marks.count(r) >= 4 for r in marks)

        await wait_until(held_past_ack_wait, timeout_s=30)  # several probes fail meanwhile
        assert {s.body for s in settles} == {b"+WPI"}, "nothing is acked or nak'd"
        consumer = await jsm.consumer_info(
            worker.subjects.stream(Domain.SECURITY), worker.subjects.durable(Domain.SECURITY)
        )
        assert (consumer.num_ack_pending, consumer.num_redelivered) == (3, 0)
        assert consumer.ack_floor is not None and consumer.ack_floor.stream_seq == 0
        assert worker.metrics.total("pipeline_retries") == 0
        await apply_streams(nc, settings)  # the stream is back
        letters = DeadLetters(js, worker.subjects)

        async def all_dead_lettered() -> bool:
            return len(await letters.list()) == 3

        await wait_until(all_dead_lettered, timeout_s=30)
        found = await letters.list()
        assert {x.headers["Nats-Msg-Id"]: x.reason for x in found} == {
            o.message_id: Reason.INVALID_JSON for o in bad
        }
        assert {x.delivered for x in found} == {1}
        await wait_until(lambda: _paused(worker, "dead_letters") == 0)
