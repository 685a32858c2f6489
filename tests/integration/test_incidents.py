"""The incident process against the real PostgreSQL: incidents from stored events as the
rules say, operators' actions kept through a rebuild, restarts, roles, outages."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pipeline.ops.migrate import migrate
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import EventStore
from pipeline.store.reader import EventReader
from projections.incidents import Correlator, load_sites, observe
from projections.incidents.process import TOPICS, IncidentProcess, ProcessRunning, rebuild
from projections.incidents.queries import (
    IncidentNotFound,
    IncidentStateError,
    acknowledge,
    get_incident,
    list_incidents,
    resolve,
)
from projections.incidents.record import recorded
from projections.incidents.service import IncidentService
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, as_role, make_settings, wait_until
from .helpers import head
from .incidents import (
    T0,
    frame,
    health,
    incident_position,
    incident_rows,
    logged,
    security,
    sites_file,
    traffic,
)


@pytest.fixture
def settings(pg_schema: str, tmp_path: Path) -> Settings:
    """The incident process's settings: as the projector role, with the tests' sites file."""
    return as_role(
        make_settings(
            "nats://unused",
            pg_schema,
            sites_file=str(sites_file(tmp_path)),
            projections_poll_s=0.2,
            projections_standby_s=0.5,
        ),
        "projector",
    )


@pytest.fixture
def store(settings: Settings) -> Iterator[EventStore]:
    event_store = EventStore(as_role(settings, "writer").eventsourcing_env())
    yield event_store
    event_store.close()


def _connect(settings: Settings, kind: str = "projector") -> psycopg.Connection[Any]:
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user=f"pipeline_{kind}", autocommit=True)


def _process(settings: Settings, batch_size: int = 500) -> IncidentProcess:
    return IncidentProcess(
        load_sites(settings.sites_file), settings.postgres_schema, batch_size=batch_size
    )


def _catch_up(settings: Settings, process: IncidentProcess | None = None) -> IncidentProcess:
    process = process or _process(settings)
    with _connect(settings) as conn:
        process.prepare(conn)
        process.catch_up(conn)
    return process


def _sec_id(message_id: str) -> uuid.UUID:
    return event_id(Domain.SECURITY, message_id)


def test_incidents_open_from_stored_events_as_the_rules_say(
    settings: Settings, store: EventStore
) -> None:
    s = timedelta(seconds=1)
    later = T0 + 10 * s
    person = str(uuid.uuid4())
    store.write(
        [
            security("door", T0, "door.forced", "high", "door-1", later),
            frame(person, T0 + 12 * s, "cam-1", [("car", 0.99), ("person", 0.91)], later),
            health("down", T0 + 3 * s, "auth", "down", later),
            *(
                security(f"badge-{i}", T0 + 20 * i * s, "badge.rejected", "low", "gate", later)
                for i in range(3)
            ),
            security("quiet", T0, "badge.accepted", "info", "door-1", later),
        ]
    )
    process = _catch_up(settings)
    assert incident_position(settings.postgres_schema) == head(settings.postgres_schema)
    with _connect(settings, "api") as conn:
        found = {i["rule"]: i for i in list_incidents(conn, settings.postgres_schema)}
    assert set(found) == {"forced-door-with-person", "service-down", "badge-rejected-burst"}
    forced = found["forced-door-with-person"]
    assert forced["zone"] == "hq/entrance"
    assert forced["state"] == "open"
    frame_id = event_id(Domain.FRAMES, person)
    assert set(forced["causes"]) == {str(_sec_id("door")), str(frame_id)}
    assert forced["reasons"] == [
        "rule severity high +5",
        "zone hq/entrance medium +1",
        "outside hours +1",
        "person 0.91 on cam-1 +2",
    ]
    assert (forced["score"], forced["level"]) == (9, "critical")
    assert found["service-down"]["zone"] == "hq/servers"
    assert (found["service-down"]["score"], found["service-down"]["level"]) == (7, "high")
    assert found["badge-rejected-burst"]["evidence"] == [
        str(_sec_id(f"badge-{i}")) for i in range(3)
    ]
    # A later person on the camera joins the incident rather than opening another.
    store.write([frame("again", T0 + 40 * s, "cam-1", [("person", 0.6)], later + 40 * s)])
    _catch_up(settings, process)
    with _connect(settings, "api") as conn:
        again = get_incident(conn, settings.postgres_schema, uuid.UUID(forced["incident_id"]))
        assert len(list_incidents(conn, settings.postgres_schema)) == 3
        assert list_incidents(conn, settings.postgres_schema, zone="hq/servers") == [
            found["service-down"]
        ]
    assert again is not None
    assert again["evidence"] == [*forced["evidence"], str(event_id(Domain.FRAMES, "again"))]
    kinds = [e["kind"] for e in again["history"]]
    assert kinds == ["IncidentOpened", "Assessed", "EvidenceAdded"]
    # The same decisions as the correlator makes alone, fed the stored events in order.
    metrics = process.metrics.registry
    opened = {
        level: metrics.get_sample_value("pipeline_incidents_opened_total", {"level": level})
        for level in ("critical", "high")
    }
    assert opened == {"critical": 1.0, "high": 2.0}
    assert _unresolved(process) == {("critical", "open"): 1.0, ("high", "open"): 2.0}
    assert metrics.get_sample_value("pipeline_incidents_lag_events") == 0


def _unresolved(process: IncidentProcess) -> dict[tuple[str, str], float]:
    """The process's unresolved incidents' gauge, without its zeros (each level and state
    is exported, 0 when none)."""
    counts = {
        (level, state): process.metrics.registry.get_sample_value(
            "pipeline_incidents_unresolved", {"level": level, "state": state}
        )
        for level in ("low", "medium", "high", "critical")
        for state in ("open", "acknowledged")
    }
    assert None not in counts.values(), counts
    return {key: n for key, n in counts.items() if n}


def test_the_log_is_what_the_correlator_decides_and_a_restart_at_every_batch_changes_nothing(
    settings: Settings, store: EventStore
) -> None:
    events = list(traffic(3000, seed=3))
    store.write(events)
    # One process through the whole store...
    once = _catch_up(settings)
    assert once.metrics.registry.get_sample_value("pipeline_incidents_position") == head(
        settings.postgres_schema
    )
    log_once = logged(settings.postgres_schema)
    rows_once = incident_rows(settings.postgres_schema)
    assert len(rows_once) > 20
    assert {row[1] for row in rows_once} == set(load_sites(settings.sites_file).rules)
    # ... decided what the correlator decides on the stored events in store order.
    correlator = Correlator(load_sites(settings.sites_file))
    reader = EventReader(settings.postgres_schema)
    expected = []
    with _connect(settings) as conn:
        items = reader.decode(reader.rows(conn, 0, head(settings.postgres_schema), TOPICS, 10**6))
    for item in items:
        o = observe(item)
        if o is not None:
            expected += [recorded(d, i) for i, d in enumerate(correlator.feed(o))]
    assert [r[0] for r in log_once] == [e.event_id for e in expected]
    # A fresh schema, the same events, a new process (a replay from zero) at every batch.
    other = f"t_{uuid.uuid4().hex[:12]}"
    again = settings.model_copy(update={"postgres_schema": other, "postgres_user": "postgres"})
    migrate(again)
    try:
        writer = EventStore(again.eventsourcing_env())
        writer.write(events)
        writer.close()
        again = as_role(again, "projector")
        with _connect(again) as conn:
            steps = 0
            while True:
                process = _process(again, batch_size=97)
                process.prepare(conn)
                if process.step(conn) is None:
                    break
                steps += 1
        assert steps > 20
        assert [r[0] for r in logged(other)] == [r[0] for r in log_once]
        assert incident_rows(other) == rows_once
    finally:
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as c:
            c.execute(f'DROP SCHEMA "{other}" CASCADE')


def test_operators_actions_are_kept_with_who_through_a_rebuild(
    settings: Settings, store: EventStore
) -> None:
    s = timedelta(seconds=1)
    later = T0 + 10 * s
    store.write(
        [
            security("door", T0, "door.forced", "high", "door-2", later),
            frame("p1", T0 + 5 * s, "cam-2", [("person", 0.8)], later),
        ]
    )
    process = _catch_up(settings)
    schema = settings.postgres_schema
    with _connect(settings, "api") as conn:
        (incident,) = list_incidents(conn, schema)
        ident = uuid.UUID(incident["incident_id"])
        done = acknowledge(conn, schema, ident, "alice", "on my way")
        assert (done["kind"], done["by"], done["note"]) == ("Acknowledged", "alice", "on my way")
        with pytest.raises(IncidentStateError, match="acknowledged already"):
            acknowledge(conn, schema, ident, "bob")
        with pytest.raises(IncidentNotFound):
            resolve(conn, schema, uuid.uuid4(), "bob")
    _catch_up(settings, process)
    with _connect(settings, "api") as conn:
        row = get_incident(conn, schema, ident)
        assert row is not None
        assert (row["state"], row["acknowledged_by"]) == ("acknowledged", "alice")
        assert _unresolved(process) == {(row["level"], "acknowledged"): 1.0}
        resolve(conn, schema, ident, "bob", "a cleaner with the wrong badge")
        with pytest.raises(IncidentStateError, match="resolved already"):
            resolve(conn, schema, ident, "bob")
    _catch_up(settings, process)
    assert _unresolved(process) == {}
    # Resolved: a person on the camera now does not join it (it pairs with the door
    # again and opens a new incident, which counts the first as a repeat).
    store.write([frame("p2", T0 + 20 * s, "cam-2", [("person", 0.9)], later + 10 * s)])
    _catch_up(settings, process)
    with _connect(settings, "api") as conn:
        row = get_incident(conn, schema, ident)
        incidents = list_incidents(conn, schema)
    assert row is not None
    assert row["state"] == "resolved"
    assert (row["resolved_by"], row["resolved_note"]) == ("bob", "a cleaner with the wrong badge")
    assert str(event_id(Domain.FRAMES, "p2")) not in row["evidence"]
    assert [h["kind"] for h in row["history"]] == [
        "IncidentOpened",
        "Assessed",
        "Acknowledged",
        "Resolved",
    ]
    assert len(incidents) == 2
    assert incidents[0]["state"] == "open"  # open ones first
    assert set(incidents[0]["causes"]) == {
        str(_sec_id("door")),
        str(event_id(Domain.FRAMES, "p2")),
    }
    before = incident_rows(schema)
    # A rebuild refuses while a process holds the lock; alone, it records nothing new.
    with _connect(settings) as conn, _connect(settings) as other:
        other.execute("SELECT pg_advisory_lock(hashtext(%s))", (f"incidents:{schema}",))
        with pytest.raises(ProcessRunning):
            rebuild(conn, _process(settings))
    log_before = logged(schema)
    with _connect(settings) as conn:
        done_rebuild = rebuild(conn, _process(settings))
    assert (done_rebuild.replayed.new, done_rebuild.replayed.missing) == (0, [])
    assert done_rebuild.incidents == 2
    assert logged(schema) == log_before
    assert incident_rows(schema) == before
    # The roles: the API cannot record decisions, the process cannot record actions,
    # and nobody changes a recorded one.
    with _connect(settings, "api") as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(
            f'INSERT INTO "{schema}".incident_events (event_id, incident_id, kind, position, '
            "data) VALUES (gen_random_uuid(), gen_random_uuid(), 'IncidentOpened', 1, '{}')"
        )
    with _connect(settings) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
        conn.execute(
            f'INSERT INTO "{schema}".incident_actions (event_id, incident_id, kind, position, '
            "by_whom) VALUES (gen_random_uuid(), gen_random_uuid(), 'Resolved', 1, 'x')"
        )
    for kind in ("projector", "api"):
        with _connect(settings, kind) as conn, pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute(f'DELETE FROM "{schema}".incident_actions')
    with (
        psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege, match="append-only"),
    ):
        conn.execute(f"UPDATE \"{schema}\".incident_actions SET by_whom = 'mallory'")


def test_an_action_taken_while_no_process_runs_reaches_the_read_model_at_its_start(
    settings: Settings, store: EventStore
) -> None:
    s = timedelta(seconds=1)
    later = T0 + 10 * s
    store.write(
        [
            security("door", T0, "door.forced", "high", "door-2", later),
            frame("p1", T0 + 5 * s, "cam-2", [("person", 0.8)], later),
        ]
    )
    _catch_up(settings)  # then the process stops
    schema = settings.postgres_schema
    with _connect(settings, "api") as conn:
        (incident,) = list_incidents(conn, schema)
        ident = uuid.UUID(incident["incident_id"])
        acknowledge(conn, schema, ident, "alice")
        resolve(conn, schema, ident, "bob", "false alarm")
    _catch_up(settings)  # a new process: it replays, then takes the actions
    with _connect(settings, "api") as conn:
        row = get_incident(conn, schema, ident)
    assert row is not None
    assert (row["state"], row["acknowledged_by"], row["resolved_by"]) == (
        "resolved",
        "alice",
        "bob",
    )
    store.write([frame("p2", T0 + 6 * s, "cam-2", [("person", 0.9)], later + s)])
    _catch_up(settings)
    with _connect(settings, "api") as conn:
        row = get_incident(conn, schema, ident)
    assert row is not None and str(event_id(Domain.FRAMES, "p2")) not in row["evidence"]


def test_run_incidents_without_a_sites_file_says_so_in_one_line_and_exits_2(
    settings: Settings, tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINE_")} | {
        "PIPELINE_POSTGRES_SCHEMA": settings.postgres_schema
    }
    done = subprocess.run(
        [sys.executable, "-m", "pipeline", "run", "incidents"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("configuration error: PIPELINE_SITES_FILE: not set")


async def test_the_database_going_away_pauses_the_process_and_it_resumes(
    embedded_pg: Any, tmp_path: Path
) -> None:
    address = embedded_pg.start()
    settings = make_settings(
        "nats://unused",
        "public",
        postgres_host=address.host,
        postgres_port=address.port,
        postgres_dbname=address.dbname,
        postgres_connect_timeout_s=1.0,
        projections_poll_s=0.2,
        sites_file=str(sites_file(tmp_path)),
    )
    migrate(settings)
    conninfo = settings.postgres_connection()

    def at_head() -> bool:
        try:
            with psycopg.connect(**conninfo) as conn:
                top = conn.execute("SELECT max(notification_id) FROM journal_events").fetchone()
                row = conn.execute(
                    "SELECT position FROM projection_positions WHERE view = 'incidents'"
                ).fetchone()
        except psycopg.Error:
            return False
        return row is not None and top is not None and row[0] == top[0]

    service = IncidentService(as_role(settings, "projector"), load_sites(settings.sites_file))
    service.start()
    try:
        writer = EventStore(as_role(settings, "writer").eventsourcing_env())
        writer.write(list(traffic(800, seed=21)))
        writer.close()
        await wait_until(at_head, timeout_s=30)
        embedded_pg.stop()
        await wait_until(lambda: service.ready() != [], timeout_s=10)
        embedded_pg.start()
        writer = EventStore(as_role(settings, "writer").eventsourcing_env())
        writer.write(list(traffic(800, seed=22, start=T0 + timedelta(hours=1))))
        writer.close()
        await wait_until(at_head, timeout_s=60)
        await wait_until(lambda: service.ready() == [], timeout_s=30)
    finally:
        service.stop()
    with psycopg.connect(**conninfo, autocommit=True) as conn:
        before = conn.execute("SELECT * FROM incidents ORDER BY incident_id").fetchall()
        done = rebuild(conn, IncidentProcess(load_sites(settings.sites_file), "public"))
        after = conn.execute("SELECT * FROM incidents ORDER BY incident_id").fetchall()
    assert before and after == before
    assert (done.replayed.new, done.replayed.missing) == (0, [])
