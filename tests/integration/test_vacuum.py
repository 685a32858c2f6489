"""A VACUUM (FREEZE) of the event table does not hold up writers, and positions still
commit in order (see `pipeline/store/recorder.py`)."""

from __future__ import annotations

import asyncio
import hashlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import psycopg
import pytest
from nats.aio.client import Client
from psycopg.sql import SQL

from pipeline.app import apply_streams
from pipeline.errors import StoreUnavailable
from pipeline.ingest.deadletter import DeadLetters
from pipeline.ops.embedded import EmbeddedNats
from pipeline.ops.migrate import EVENTS_STORAGE, migrate
from pipeline.ops.simulate import Expect, Outgoing, Traffic, publish, stored_events
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from pipeline.store.recorder import ORDER_LOCK_SPACE, order_lock
from schemas import Domain
from streams import Subjects

from ..conftest import PG_DB, PG_HOST, PG_PORT, make_settings, wait_until
from .helpers import count_events, ids_of, start_worker, stop_worker, stored_ids

FILLED = 20_000


def _connect() -> psycopg.Connection[Any]:
    return psycopg.connect(
        host=PG_HOST, port=PG_PORT, dbname=PG_DB, user="postgres", autocommit=True
    )


def _table(schema: str) -> str:
    return f'"{schema}".journal_events'


def _filled_id(n: int) -> uuid.UUID:
    return uuid.UUID(hashlib.md5(f"vacuum-test:{n}".encode()).hexdigest())


def _fill(schema: str, count: int = FILLED) -> None:
    """`count` rows of about 600 bytes, so that a vacuum has pages to go through."""
    with _connect() as conn:
        conn.execute(
            f"INSERT INTO {_table(schema)} (originator_id, originator_version, topic, state) "
            "SELECT md5('vacuum-test:' || g)::uuid, 1, 'filled', "
            "convert_to(json_build_object('n', g, 'pad', repeat('x', 560))::text, 'UTF8') "
            "FROM generate_series(1, %s) g",
            (count,),
        )


def _writer(schema: str, **overrides: object) -> Settings:
    return make_settings("nats://unused", schema, postgres_user="pipeline_writer", **overrides)


@contextmanager
def running_vacuum(schema: str) -> Iterator[Callable[[], bool]]:
    """`VACUUM (FREEZE, DISABLE_PAGE_SKIPPING)` of the event table, slowed by the cost delay
    so that it runs for as long as the test needs; yields whether it is still running, and
    cancels it at the end."""
    outcome: list[BaseException | None] = []
    pid: list[int] = []

    def vacuum() -> None:
        with _connect() as conn:
            pid.append(conn.info.backend_pid)
            # Every page costs at least 1: a pause of 20 ms after each one.
            conn.execute("SET vacuum_cost_delay = '20ms'")
            conn.execute("SET vacuum_cost_limit = 1")
            try:
                conn.execute(f"VACUUM (FREEZE, DISABLE_PAGE_SKIPPING) {_table(schema)}")
                outcome.append(None)
            except psycopg.errors.QueryCanceled as exc:
                outcome.append(exc)

    thread = threading.Thread(target=vacuum)
    thread.start()
    with _connect() as watch:

        def running() -> bool:
            row = watch.execute(
                "SELECT count(*) FROM pg_locks l JOIN pg_stat_progress_vacuum v USING (pid) "
                "WHERE l.pid = %s AND l.relation = %s::regclass AND l.granted "
                "AND l.mode = 'ShareUpdateExclusiveLock' AND v.phase = 'scanning heap'",
                (pid[0] if pid else 0, _table(schema)),
            ).fetchone()
            return bool(row and row[0])

        deadline = time.monotonic() + 20
        while not running():
            assert time.monotonic() < deadline, "the vacuum did not start"
            time.sleep(0.05)
        try:
            yield running
        finally:
            watch.execute("SELECT pg_cancel_backend(%s)", (pid[0],))
            thread.join(30)
    assert not thread.is_alive() and len(outcome) == 1


def test_migrate_sets_the_event_tables_vacuum_settings(pg_schema: str) -> None:
    with _connect() as conn:
        row = conn.execute(
            "SELECT reloptions FROM pg_class WHERE oid = %s::regclass", (_table(pg_schema),)
        ).fetchone()
    assert row is not None
    options = dict(o.split("=", 1) for o in row[0])
    assert {k: options.get(k) for k in EVENTS_STORAGE} == EVENTS_STORAGE


def test_inserts_complete_while_a_vacuum_freeze_runs(pg_schema: str) -> None:
    """With a lock timeout of 1 s, every batch is stored while the vacuum holds its lock;
    the EXCLUSIVE table lock earlier releases took would have waited past it."""
    settings = _writer(pg_schema, postgres_lock_timeout_s=1)
    migrate(settings.model_copy(update={"postgres_user": "postgres"}))  # the function's 1 s
    _fill(pg_schema)
    messages = iter(stored_events(10**6, seed=41, cameras=0))
    store = EventStore(settings.eventsourcing_env())
    try:
        with running_vacuum(pg_schema) as vacuum_running:
            stored = 0
            for _ in range(10):
                started = time.monotonic()
                result = store.write([next(messages) for _ in range(50)])
                assert time.monotonic() - started < 1.0
                stored += len(result.stored)
            assert stored == 500
            # The lock of earlier releases, with the same timeout: it waits for the vacuum.
            with (
                _connect() as conn,
                pytest.raises(psycopg.errors.LockNotAvailable),
                conn.transaction(),
            ):
                conn.execute("SET LOCAL lock_timeout = '1s'")
                conn.execute(f"LOCK TABLE {_table(pg_schema)} IN EXCLUSIVE MODE")
            assert vacuum_running(), "the vacuum ended before the inserts were done"
    finally:
        store.close()


def test_writers_take_turns_on_the_order_lock(pg_schema: str) -> None:
    """The insert function waits for the writers' advisory lock (here held by another
    session) and fails past the lock timeout, as it did for the table lock."""
    settings = _writer(pg_schema, postgres_lock_timeout_s=1)
    migrate(settings.model_copy(update={"postgres_user": "postgres"}))
    messages = iter(stored_events(10**6, seed=43, cameras=0))
    store = EventStore(settings.eventsourcing_env())
    try:
        with _connect() as holder:
            with holder.transaction():
                holder.execute(
                    "SELECT pg_advisory_xact_lock(%s, %s::regclass::oid::int)",
                    (ORDER_LOCK_SPACE, _table(pg_schema)),
                )
                with pytest.raises(StoreUnavailable, match="lock"):
                    store.write([next(messages) for _ in range(5)])
            assert len(store.write([next(messages) for _ in range(5)]).stored) == 5
    finally:
        store.close()


def test_migrating_beside_a_vacuum_holds_up_no_writer(pg_schema: str) -> None:
    """`pipeline db migrate` waits for the vacuum to end before its DDL on the event table
    (which would queue behind the vacuum, and every writer behind it)."""
    settings = _writer(pg_schema, postgres_lock_timeout_s=1)
    owner = settings.model_copy(update={"postgres_user": "postgres"})
    migrate(owner)
    _fill(pg_schema)
    messages = iter(stored_events(10**6, seed=47, cameras=0))
    store = EventStore(settings.eventsourcing_env())
    failed: list[BaseException] = []

    def migrating() -> None:
        try:
            migrate(owner)
        except BaseException as exc:
            failed.append(exc)

    thread = threading.Thread(target=migrating)
    try:
        with running_vacuum(pg_schema) as vacuum_running:
            thread.start()
            time.sleep(2)  # migrate is at the event table by now
            for _ in range(5):
                started = time.monotonic()
                assert len(store.write([next(messages) for _ in range(20)]).stored) == 20
                assert time.monotonic() - started < 1.0
                time.sleep(0.5)
            assert vacuum_running() and thread.is_alive(), "migrate did not wait"
        thread.join(30)  # the vacuum cancelled: migrate goes on
        assert not thread.is_alive() and failed == []
    finally:
        store.close()


def _earlier_function(schema: str) -> None:
    """`journal_events_insert_old`: the insert function as earlier releases made it (the
    EXCLUSIVE table lock instead of the advisory lock)."""
    with _connect() as conn:
        row = conn.execute(
            "SELECT pg_get_functiondef(%s::regproc)", (f'"{schema}".journal_events_insert_new',)
        ).fetchone()
        assert row is not None
        current = order_lock(schema, "journal_events").as_string(conn)
        assert current in row[0]
        earlier = row[0].replace(current, f"LOCK TABLE {_table(schema)} IN EXCLUSIVE MODE")
        conn.execute(earlier.replace("journal_events_insert_new(", "journal_events_insert_old("))


def test_old_and_new_insert_functions_together_commit_positions_in_order(
    pg_schema: str,
) -> None:
    """Writers on the earlier function (table lock) and on this one (advisory lock) at
    once, as during a rolling upgrade: a follower reading after the last position it saw
    misses no event (none commits below a position already visible)."""
    _earlier_function(pg_schema)
    stores = [
        EventStore(make_settings("nats://unused", pg_schema).eventsourcing_env()) for _ in range(4)
    ]
    for store in stores[::2]:
        recorder: Any = store._recorder
        recorder.call_insert_new = SQL(
            recorder.call_insert_new.as_string(None).replace("_insert_new(", "_insert_old(")
        )
    done = threading.Event()
    seen: list[int] = []
    errors: list[BaseException] = []

    def follow() -> None:
        last = 0
        with _connect() as conn:
            while not done.is_set():
                rows = conn.execute(
                    f"SELECT notification_id FROM {_table(pg_schema)} "
                    "WHERE notification_id > %s ORDER BY notification_id",
                    (last,),
                ).fetchall()
                seen.extend(r[0] for r in rows)
                last = seen[-1] if seen else 0

    def write(store: EventStore, seed: int) -> None:
        try:
            messages = iter(stored_events(10**6, seed=seed, cameras=0))
            for _ in range(40):
                store.write([next(messages) for _ in range(20)])
        except BaseException as exc:
            errors.append(exc)

    follower = threading.Thread(target=follow)
    follower.start()
    writers = [threading.Thread(target=write, args=(s, 50 + n)) for n, s in enumerate(stores)]
    try:
        for thread in writers:
            thread.start()
        for thread in writers:
            thread.join(120)
    finally:
        time.sleep(0.5)  # the follower's last reads
        done.set()
        follower.join(30)
        for store in stores:
            store.close()
    assert errors == []
    with _connect() as conn:
        every = [r[0] for r in conn.execute(f"SELECT notification_id FROM {_table(pg_schema)}")]
    assert len(every) == 4 * 40 * 20
    assert sorted(seen) == sorted(every), "an event committed below a position already seen"


@pytest.mark.slow
async def test_workers_storing_steadily_beside_a_vacuum_freeze_lose_nothing(
    nats_server: EmbeddedNats, pg_schema: str, nc: Client, tmp_path: Path
) -> None:
    """Two worker processes store a steady flow while the vacuum runs: every message is
    stored while it still runs, once, and none is dead-lettered."""
    subjects = Subjects()
    await apply_streams(nc, make_settings(nats_server.url, pg_schema, ack_wait_s=2.0))
    _fill(pg_schema)
    traffic = Traffic(subjects, seed=61, duplicate_ratio=0.05, bad_ratio=0.0)
    ledger: list[Outgoing] = []
    log = tmp_path / "worker.log"
    workers = [start_worker(nats_server.url, pg_schema, log) for _ in range(2)]
    try:
        with running_vacuum(pg_schema) as vacuum_running:
            await publish(
                nc.jetstream(), iter(traffic), rate=300, duration_s=15, on_published=ledger.append
            )
            expected = {
                i
                for d in (Domain.SECURITY, Domain.MONITORING, Domain.METRICS)
                for i in ids_of(
                    d, [o.message_id for o in ledger if o.domain is d and o.expect is Expect.STORE]
                )
            }
            assert len(expected) > 3000
            await wait_until(
                lambda: count_events(pg_schema) >= FILLED + len(expected), timeout_s=60
            )
            assert vacuum_running(), "the vacuum ended before the flow was stored"
        letters = await DeadLetters(nc.jetstream(), subjects).list(limit=100)
        await asyncio.sleep(3)  # redeliveries of anything unacked (ack_wait 2 s) play out
    finally:
        for worker in workers:
            stop_worker(worker)
    counts = stored_ids(pg_schema)
    filled = {_filled_id(n) for n in range(1, FILLED + 1)}
    assert set(counts) - filled == expected, "lost or unexpected events"
    assert set(counts.values()) == {1}, "an event was stored twice"
    assert letters == []
    assert all(w.returncode == 0 for w in workers), log.read_text()[-3000:]
