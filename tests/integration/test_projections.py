"""Views against the real PostgreSQL: contents, exactly once, rebuild, poison, notifications."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Iterator
from datetime import datetime
from decimal import Decimal
from types import SimpleNamespace
from typing import Any

import psycopg
import pytest

from pipeline.ops.migrate import migrate
from pipeline.ops.simulate import stored_events
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import Accepted, EventStore
from pipeline.store.follow import Listener
from pipeline.store.reader import EventReader
from projections import VIEWS, SecurityView
from projections.positions import Positions, SkipRefused
from projections.rebuild import Rebuilt, rebuild, rebuild_views
from projections.runner import ViewStalled
from projections.service import ProjectionService
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, wait_until
from .helpers import head, positions, view_rows, views_current, write_events, writer_store


@pytest.fixture
def settings(pg_schema: str) -> Settings:
    """The projections' settings: as the projector role."""
    return as_role(
        make_settings(
            "nats://unused", pg_schema, projections_poll_s=0.5, projections_standby_s=0.5
        ),
        "projector",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


@pytest.fixture
def service(settings: Settings) -> Iterator[ProjectionService]:
    svc = ProjectionService(settings)
    svc.start()
    yield svc
    svc.stop()


def _connect() -> psycopg.Connection[Any]:
    """A connection as the projector role: rebuilds make and swap the views' tables."""
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user="pipeline_projector", autocommit=True)


def _query(sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        return conn.execute(sql, params).fetchall()


def _time(value: str) -> datetime:
    return datetime.fromisoformat(value)


async def test_views_hold_what_the_events_say(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    events = write_events(store, 3000, seed=1)
    await wait_until(lambda: views_current(pg_schema), timeout_s=60)
    s = pg_schema
    # In store order (a batch's rows may be numbered in another order than sent).
    at = dict(_query(f'SELECT originator_id, notification_id FROM "{s}".journal_events'))
    by_domain: dict[Domain, list[Accepted]] = defaultdict(list)
    for e in sorted(events, key=lambda e: at[e.event_id]):
        by_domain[e.domain].append(e)

    # Security: every event once, and counts per minute, severity and zone that add up.
    security = by_domain[Domain.SECURITY]
    rows = _query(f'SELECT message_id, source, severity, zone FROM "{s}".security_events')
    assert sorted(rows) == sorted(
        (e.message_id, e.payload["source"], e.payload["severity"], e.payload["zone"])
        for e in security
    )
    counts: Counter[tuple[Any, ...]] = Counter()
    for e in security:
        minute = _time(e.payload["occurred_at"]).replace(second=0, microsecond=0)
        counts[(minute, e.payload["severity"], e.payload["zone"])] += 1
    stored_counts = _query(f'SELECT minute, severity, zone, events FROM "{s}".security_counts')
    assert {(m, sev, z): n for m, sev, z, n in stored_counts} == counts

    # Health: the last report stored of each instance is its status; transitions follow.
    last: dict[tuple[str, str], dict[str, Any]] = {}
    changes = 0
    for e in by_domain[Domain.MONITORING]:
        key = (e.payload["service"], e.payload["instance"])
        if key not in last or last[key]["status"] != e.payload["status"]:
            changes += 1
        last[key] = e.payload
    status = _query(f'SELECT service, instance, status FROM "{s}".service_status')
    assert {(a, b): c for a, b, c in status} == {k: p["status"] for k, p in last.items()}
    assert _query(f'SELECT count(*) FROM "{s}".service_transitions')[0][0] == changes
    checks = _query(f'SELECT service, instance, name, status FROM "{s}".service_checks')
    assert {(a, b, c): d for a, b, c, d in checks} == {
        (*k, c["name"]): c["status"] for k, p in last.items() for c in p["checks"]
    }

    # Metrics: count, exact sum, min, max per service, instance, name, labels and minute.
    samples: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for e in by_domain[Domain.METRICS]:
        p = e.payload
        minute = _time(p["collected_at"]).replace(second=0, microsecond=0)
        for sample in p["samples"]:
            labels = json.dumps(sample.get("labels") or {}, sort_keys=True)
            samples[(p["service"], p["instance"], sample["name"], labels, minute)].append(
                sample["value"]
            )
    rollups = _query(
        f"SELECT service, instance, name, labels::text, minute, samples, sum, min, max "
        f'FROM "{s}".metric_rollups'
    )
    assert {
        (a, b, c, json.dumps(json.loads(d), sort_keys=True), m): (n, total, lo, hi)
        for a, b, c, d, m, n, total, lo, hi in rollups
    } == {k: (len(v), sum(Decimal(repr(x)) for x in v), min(v), max(v)) for k, v in samples.items()}

    # Cameras: frames analysed and skipped, detections per label and minute.
    frames = by_domain[Domain.FRAMES]
    assert frames, "the generated traffic has frames"
    activity = _query(
        f"SELECT camera, frames_analysed, frames_skipped, detections, model_name "
        f'FROM "{s}".camera_activity'
    )
    expected: dict[str, list[Any]] = defaultdict(lambda: [0, 0, 0, None])
    for e in frames:
        row = expected[e.payload["frame"]["camera"]]
        if e.event == "FrameSkipped":
            row[1] += 1
        else:
            row[0] += 1
            row[2] += len(e.payload["detections"])
            row[3] = e.payload["model"]["name"]
    assert {c: [a, sk, d, m] for c, a, sk, d, m in activity} == dict(expected)
    per_label = _query(f'SELECT sum(detections) FROM "{s}".camera_detections')[0][0]
    assert per_label == sum(len(e.payload.get("detections", [])) for e in frames)


async def test_a_rebuild_gives_what_the_live_run_gave(
    settings: Settings, store: EventStore, pg_schema: str
) -> None:
    """Live in small, uneven batches while events arrive; rebuilt in large ones."""
    small = ProjectionService(settings.model_copy(update={"projections_batch_size": 7}))
    small.start()
    try:
        for seed in range(6):
            write_events(store, 500, seed=seed, chunk=37)
        await wait_until(lambda: views_current(pg_schema), timeout_s=120)
        live = {name: view_rows(pg_schema, cls) for name, cls in VIEWS.items()}
        with _connect() as conn:
            for name, cls in VIEWS.items():
                done = rebuild(conn, pg_schema, cls(), batch_size=5000)
                assert done.position == head(pg_schema)
                assert view_rows(pg_schema, cls) == live[name], f"view {name}"
        # All at once, each view in a process of its own: the same again.
        rebuilt = rebuild_views(settings.postgres_connection(), pg_schema, list(VIEWS), jobs=2)
        for name, cls in VIEWS.items():
            done = rebuilt[name]
            assert isinstance(done, Rebuilt) and done.position == head(pg_schema), done
            assert view_rows(pg_schema, cls) == live[name], f"view {name} (in processes)"
        # The live runners go on from the rebuilt views.
        write_events(store, 300, seed=99)
        await wait_until(lambda: views_current(pg_schema), timeout_s=60)
    finally:
        small.stop()
    assert (
        sum(n for (n,) in _query(f'SELECT count(*) FROM "{pg_schema}".security_events'))
        == (
            _query(
                f'SELECT count(*) FROM "{pg_schema}".journal_events WHERE topic LIKE %s',
                "%SecurityEvent.Recorded",
            )[0][0]
        )
    )


async def test_a_rebuild_runs_beside_the_live_view_which_keeps_answering(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    write_events(store, 4000, seed=3)
    await wait_until(lambda: views_current(pg_schema), timeout_s=60)
    answers: list[int] = []
    stop = threading.Event()

    def query() -> None:
        with _connect() as conn:
            while not stop.is_set():
                sql = f'SELECT count(*) FROM "{pg_schema}".security_events'
                answers.append(conn.execute(sql).fetchone()[0])  # type: ignore[index]

    reader = threading.Thread(target=query)
    reader.start()
    writer = threading.Thread(target=write_events, args=(store, 2000), kwargs={"seed": 4})
    writer.start()
    try:
        with _connect() as conn:
            done = rebuild(conn, pg_schema, SecurityView(), batch_size=500)
    finally:
        writer.join()
        stop.set()
        reader.join()
    assert done.events > 0
    assert answers and min(answers) > 0, "the live view answered all along"
    await wait_until(lambda: views_current(pg_schema), timeout_s=60)
    security = _query(
        f'SELECT count(*) FROM "{pg_schema}".journal_events WHERE topic LIKE %s',
        "%SecurityEvent.Recorded",
    )[0][0]
    assert _query(f'SELECT count(*) FROM "{pg_schema}".security_events')[0][0] == security
    assert (
        _query(f'SELECT count(DISTINCT position) FROM "{pg_schema}".security_events')[0][0]
        == security
    )


def _poison(store: EventStore, pg_schema: str) -> int:
    """A stored security event the view cannot apply (its payload lacks `source`)."""
    good = next(e for e in stored_events(50, seed=8) if e.domain is Domain.SECURITY)
    payload = {k: v for k, v in good.payload.items() if k != "source"}
    bad = Accepted(**{**good.__dict__, "message_id": "poison-1", "payload": payload})
    store.write([bad])
    found = _query(
        f'SELECT notification_id FROM "{pg_schema}".journal_events WHERE originator_id = %s',
        event_id(Domain.SECURITY, "poison-1"),
    )
    return int(found[0][0])


async def test_a_poison_event_stops_its_view_only_until_it_is_skipped(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    write_events(store, 500, seed=5)
    at = _poison(store, pg_schema)
    write_events(store, 500, seed=6)
    top = head(pg_schema)
    # The other views reach the head; the security view stops just before the poison.
    await wait_until(lambda: views_current(pg_schema, ["health", "metrics", "cameras"]))
    await wait_until(lambda: positions(pg_schema).get("security", (0, ""))[1] == "stalled")
    assert positions(pg_schema)["security"][0] < at
    runner = next(r for r in service.runners if r.view.name == "security")
    assert runner.metrics.stalled.labels("security")._value.get() == 1
    with _connect() as conn:
        row = Positions(pg_schema).get(conn, "security")
        assert row.stalled_at == at
        assert row.error is not None and "source" in row.error
        with pytest.raises(SkipRefused):
            Positions(pg_schema).skip(conn, "security", at + 1)
        # A rebuild meets the same event: it stops, and leaves the live view as it was.
        before = view_rows(pg_schema, SecurityView)
        with pytest.raises(ViewStalled, match=f"position {at}"):
            rebuild(conn, pg_schema, SecurityView())
        assert view_rows(pg_schema, SecurityView) == before
        assert "security__next" not in positions(pg_schema)
    # In processes, the stalled rebuild is reported and the other view still swaps in.
    results = rebuild_views(settings.postgres_connection(), pg_schema, ["security", "health"])
    assert isinstance(results["security"], ViewStalled), results
    assert f"position {at}" in str(results["security"])
    assert isinstance(results["health"], Rebuilt) and results["health"].position == top
    assert view_rows(pg_schema, SecurityView) == before
    assert not {"security__next", "health__next"} & set(positions(pg_schema))
    # A restart tries the event once more, meets it again and stays stalled, visibly.
    service.stop()
    restarted = ProjectionService(settings)
    restarted.start()
    try:
        again = next(r for r in restarted.runners if r.view.name == "security")
        await wait_until(lambda: again.stalled_at == at)
        assert again.metrics.stalled.labels("security")._value.get() == 1
        assert positions(pg_schema)["security"][1] == "stalled"
    finally:
        restarted.stop()
    service.start()
    with _connect() as conn:
        Positions(pg_schema).skip(conn, "security", at, note="test: payload without source")
    await wait_until(lambda: views_current(pg_schema))
    assert runner.metrics.stalled.labels("security")._value.get() == 0
    assert _query(f'SELECT view, position, note FROM "{pg_schema}".projection_skips') == [
        ("security", at, "test: payload without source")
    ]
    assert positions(pg_schema)["security"] == (top, "running")
    # A rebuild skips what was skipped, and gives the same view.
    live = view_rows(pg_schema, SecurityView)
    with _connect() as conn:
        rebuild(conn, pg_schema, SecurityView())
    assert view_rows(pg_schema, SecurityView) == live


async def test_views_catch_up_without_notifications(
    settings: Settings, store: EventStore, pg_schema: str
) -> None:
    """A lost NOTIFY (here: every one) delays a view by the poll interval at most."""
    svc = ProjectionService(settings)
    svc.listener._wake = lambda: None  # type: ignore[method-assign]
    svc.start()
    try:
        await wait_until(lambda: positions(pg_schema).keys() >= set(VIEWS))
        write_events(store, 200, seed=7)
        started = time.monotonic()
        await wait_until(lambda: views_current(pg_schema), timeout_s=10)
        assert time.monotonic() - started < settings.projections_poll_s + 3.0
    finally:
        svc.stop()


async def test_the_listener_comes_back_after_its_connection_is_killed(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    await wait_until(service.listener.connected.is_set)
    killed = _query(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE query LIKE 'LISTEN%%' "
        "AND datname = %s",
        PG_DB,
    )
    assert killed
    write_events(store, 100, seed=9)
    await wait_until(lambda: views_current(pg_schema), timeout_s=10)
    await wait_until(service.listener.connected.is_set, timeout_s=10)
    assert service.ready() == []


def test_a_schemas_followers_wake_for_its_own_commits_only() -> None:
    """Channels are the database's: each schema's commits notify a channel of their own,
    so two pipelines in one database do not wake each other's followers."""
    runner = threading.Event()
    stop = threading.Event()
    with writer_store("listen_mine") as mine, writer_store("listen_other") as other:
        listener = Listener(EventReader("listen_mine").channel, [SimpleNamespace(wake=runner)])
        thread = threading.Thread(
            target=listener.run,
            args=(lambda: psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres"), stop),
        )
        thread.start()
        try:
            assert listener.connected.wait(10)
            time.sleep(0.2)
            runner.clear()  # woken once on connecting, for what was stored before
            write_events(other, 10, seed=31)
            assert not runner.wait(1.5), "woken by another schema's commit"
            write_events(mine, 10, seed=32)
            assert runner.wait(5), "not woken by its own schema's commit"
        finally:
            stop.set()
            thread.join(10)


async def test_two_processes_share_the_views_and_apply_each_event_once(
    settings: Settings, store: EventStore, pg_schema: str
) -> None:
    first, second = ProjectionService(settings), ProjectionService(settings)
    first.start()
    second.start()
    try:
        write_events(store, 2000, seed=10)
        await wait_until(lambda: views_current(pg_schema), timeout_s=60)

        def active(svc: ProjectionService) -> set[str]:
            return {
                r.view.name
                for r in svc.runners
                if r.metrics.active.labels(r.view.name)._value.get()
            }

        assert active(first) | active(second) == set(VIEWS)
        assert not active(first) & active(second)
        applied = {
            name: sum(svc.metrics.applied.labels(name)._value.get() for svc in (first, second))
            for name in VIEWS
        }
        topics = {name: VIEWS[name].topics() for name in VIEWS}
        for name in VIEWS:
            expected = _query(
                f'SELECT count(*) FROM "{pg_schema}".journal_events WHERE topic = ANY(%s)',
                topics[name],
            )[0][0]
            assert applied[name] == expected, name
        # One stops: the other takes its views over.
        first.stop()
        write_events(store, 500, seed=11)
        await wait_until(lambda: views_current(pg_schema), timeout_s=30)
        assert active(second) == set(VIEWS)
    finally:
        first.stop()
        second.stop()


async def test_a_view_over_monitoring_reads_v1_and_v2_events_alike(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    """An event stored as payload v1 (the whole message) is upcast before the view sees it."""
    state = {
        "timestamp": {"_type_": "datetime_iso", "_data_": "2026-11-27T09:00:01+00:00"},
        "originator_topic": "pipeline.domain:HealthReport",
        "message_id": "v1-report",
        "subject": "monitoring.v1.billing",
        "stream_seq": 1,
        "schema_version": "1.0",
        "payload": {
            "id": "v1-report",
            "schema_version": "2.0",
            "service": "billing",
            "instance": "billing-old",
            "reported_at": "2026-11-27T09:00:00Z",
            "status": "degraded",
            "checks": [{"name": "db", "status": "degraded"}],
        },
    }
    _query(
        f'INSERT INTO "{pg_schema}".journal_events '
        "(originator_id, originator_version, topic, state) VALUES (%s, 1, %s, %s) RETURNING 1",
        event_id(Domain.MONITORING, "v1-report"),
        "pipeline.domain:HealthReport.Recorded",
        json.dumps(state).encode(),
    )
    write_events(store, 300, seed=12)
    await wait_until(lambda: views_current(pg_schema), timeout_s=30)
    assert _query(
        f'SELECT status FROM "{pg_schema}".service_status WHERE instance = %s', "billing-old"
    ) == [("degraded",)]
    assert _query(
        f'SELECT name, status FROM "{pg_schema}".service_checks WHERE instance = %s',
        "billing-old",
    ) == [("db", "degraded")]
    assert _query(f'SELECT count(*) FROM "{pg_schema}".service_status')[0][0] > 1


async def test_views_ride_out_a_database_restart(embedded_pg: Any) -> None:
    address = embedded_pg.start()
    settings = make_settings(
        "nats://unused",
        "public",
        postgres_host=address.host,
        postgres_port=address.port,
        postgres_dbname=address.dbname,
        postgres_connect_timeout_s=1.0,
        projections_poll_s=0.5,
    )
    migrate(settings)
    conninfo = settings.postgres_connection()

    def at_head() -> bool:
        try:
            with psycopg.connect(**conninfo) as conn:
                top = conn.execute("SELECT max(notification_id) FROM journal_events").fetchone()
                rows = conn.execute("SELECT view, position FROM projection_positions").fetchall()
        except psycopg.Error:
            return False
        return len(rows) == len(VIEWS) and all(p == top[0] for _, p in rows)  # type: ignore[index]

    svc = ProjectionService(as_role(settings, "projector"))
    svc.start()
    try:
        store = EventStore(as_role(settings, "writer").eventsourcing_env())
        write_events(store, 500, seed=13)
        store.close()
        await wait_until(at_head, timeout_s=30)
        embedded_pg.stop()
        await wait_until(lambda: svc.ready() != [], timeout_s=10)
        await asyncio.sleep(2)
        embedded_pg.start()
        store = EventStore(as_role(settings, "writer").eventsourcing_env())
        write_events(store, 500, seed=14)
        store.close()
        await wait_until(at_head, timeout_s=60)
        await wait_until(lambda: svc.ready() == [], timeout_s=30)
    finally:
        svc.stop()
    with psycopg.connect(**conninfo) as conn:
        security = conn.execute(
            "SELECT count(*) FROM journal_events WHERE topic LIKE '%SecurityEvent.Recorded'"
        ).fetchone()
        rows = conn.execute("SELECT count(DISTINCT position) FROM security_events").fetchone()
    assert rows == security


async def test_a_rebuild_takes_in_events_stored_while_it_builds_its_indexes(
    settings: Settings,
    store: EventStore,
    service: ProjectionService,
    pg_schema: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Many batches arrive between the first catch-up and the swap: each applied once."""
    import projections.rebuild as module

    write_events(store, 1000, seed=15)
    build_indexes = module.create_indexes

    def meanwhile(*args: Any, **kwargs: Any) -> None:
        write_events(store, 1500, seed=16)
        build_indexes(*args, **kwargs)

    monkeypatch.setattr(module, "create_indexes", meanwhile)
    with _connect() as conn:
        for cls in VIEWS.values():
            rebuild(conn, pg_schema, cls(), batch_size=100)
    monkeypatch.setattr(module, "create_indexes", build_indexes)
    await wait_until(lambda: views_current(pg_schema), timeout_s=60)
    rebuilt = {name: view_rows(pg_schema, cls) for name, cls in VIEWS.items()}
    with _connect() as conn:
        for name, cls in VIEWS.items():
            rebuild(conn, pg_schema, cls())
            assert view_rows(pg_schema, cls) == rebuilt[name], name


async def test_batches_sharing_a_transaction_merge_once(
    settings: Settings, store: EventStore, pg_schema: str
) -> None:
    """Several batches in one transaction (as in a rebuild's swap) add up, once each."""
    from projections.runner import ViewRunner

    write_events(store, 600, seed=17)
    runner = ViewRunner(VIEWS["metrics"](), pg_schema, batch_size=50)
    with _connect() as conn:
        runner.prepare(conn)
        with conn.transaction():
            assert runner.catch_up(conn) > 50
    samples = _query(f'SELECT sum(samples) FROM "{pg_schema}".metric_rollups')[0][0]
    expected = sum(
        len(e.payload["samples"]) for e in stored_events(600, seed=17) if e.domain is Domain.METRICS
    )
    assert samples == expected


async def test_valid_messages_the_tables_could_not_hold_do_not_stop_a_view(
    settings: Settings, store: EventStore, service: ProjectionService, pg_schema: str
) -> None:
    """NUL characters (text and jsonb refuse them) and a label set too large for an index."""
    events = list(stored_events(200, seed=18))
    security = next(e for e in events if e.domain is Domain.SECURITY)
    metrics = next(e for e in events if e.domain is Domain.METRICS)
    health = next(e for e in events if e.domain is Domain.MONITORING)
    huge = {f"k{i:02d}-{'x' * 60}": "v" * 256 for i in range(32)}
    odd = [
        Accepted(
            **{
                **security.__dict__,
                "message_id": "nul-1",
                "payload": {
                    **security.payload,
                    "zone": "a\x00b",
                    "attributes": {"k\x00": "v\x00", "t": "\\u0000"},
                },
            }
        ),
        Accepted(
            **{
                **metrics.__dict__,
                "message_id": "huge-labels",
                "payload": {
                    **metrics.payload,
                    "samples": [{"name": "wide", "value": 1.0, "labels": huge}],
                },
            }
        ),
        Accepted(
            **{
                **health.__dict__,
                "message_id": "nul-2",
                "payload": {**health.payload, "instance": "odd-0", "message": "down\x00"},
            }
        ),
    ]
    store.write(events + odd)
    await wait_until(lambda: views_current(pg_schema), timeout_s=30)
    assert all(state == "running" for _, state in positions(pg_schema).values())
    zone, attributes = _query(
        f'SELECT zone, attributes FROM "{pg_schema}".security_events WHERE message_id = %s',
        "nul-1",
    )[0]
    assert zone == "a\ufffdb"
    assert attributes == {"k\x00": "v\x00", "t": "\\u0000"}  # a json column keeps them
    assert _query(f'SELECT labels FROM "{pg_schema}".metric_rollups WHERE name = %s', "wide") == [
        (huge,)
    ]
    assert _query(
        f'SELECT message FROM "{pg_schema}".service_status WHERE instance = %s', "odd-0"
    ) == [("down\ufffd",)]
