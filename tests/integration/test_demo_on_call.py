"""The demo's on-call (`pipeline.ops.demo.resolve_quiet`) over the real incident tables:
it resolves, as the API role, the open incidents opened long enough ago, and leaves an
acknowledged one and a recent one alone."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg

from pipeline.ops.demo import ON_CALL, resolve_quiet
from pipeline.settings import Settings
from pipeline.store.eventstore import EventStore
from projections.incidents import load_sites
from projections.incidents.process import IncidentProcess
from projections.incidents.queries import acknowledge, list_incidents

from ..conftest import as_role, make_settings
from .incidents import health, security, sites_file


def _catch_up(settings: Settings, process: IncidentProcess) -> None:
    projector = as_role(settings, "projector")
    with psycopg.connect(**projector.postgres_connection(), autocommit=True) as conn:
        process.prepare(conn)
        process.catch_up(conn)


def test_the_on_call_resolves_unacknowledged_incidents_opened_long_enough_ago(
    pg_schema: str, tmp_path: Path
) -> None:
    settings = make_settings("nats://unused", pg_schema, sites_file=str(sites_file(tmp_path)))
    now = datetime.now(UTC)
    old = now - timedelta(minutes=10)
    store = EventStore(as_role(settings, "writer").eventsourcing_env())
    store.write(
        [
            security("entrance", old, "alarm.tamper", "critical", "door-1", old),
            security("vault", old, "alarm.tamper", "critical", "door-2", old),
            health("servers", now, "auth", "down", now),
        ]
    )
    store.close()
    process = IncidentProcess(load_sites(settings.sites_file), pg_schema)
    _catch_up(settings, process)
    api = as_role(settings, "api")
    with psycopg.connect(**api.postgres_connection(), autocommit=True) as conn:
        found = {i["zone"]: i["incident_id"] for i in list_incidents(conn, pg_schema)}
        assert set(found) == {"hq/entrance", "hq/vault", "hq/servers"}, found
        acknowledge(conn, pg_schema, uuid.UUID(found["hq/vault"]), "alice")
    _catch_up(settings, process)  # the process takes it (within a second, live)

    assert resolve_quiet(api, 180) == [found["hq/entrance"]]
    assert resolve_quiet(api, 180) == []  # once

    _catch_up(settings, process)  # the process takes the actions into the read model
    with psycopg.connect(**api.postgres_connection(), autocommit=True) as conn:
        now_found = {i["zone"]: i for i in list_incidents(conn, pg_schema)}
    entrance = now_found["hq/entrance"]
    assert entrance["state"] == "resolved" and entrance["resolved_by"] == ON_CALL
    assert "unacknowledged" in entrance["resolved_note"]
    assert now_found["hq/vault"]["state"] == "acknowledged"
    assert now_found["hq/servers"]["state"] == "open"
