"""Kill -9 the incident process at random points while events arrive: its incidents equal
a rebuild from zero, and no decision is recorded twice."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
import uuid
from collections import Counter
from pathlib import Path

import psycopg

from pipeline.store.eventstore import EventStore
from projections.incidents import load_sites
from projections.incidents.process import IncidentProcess, rebuild
from projections.incidents.queries import list_incidents, resolve

from ..conftest import PG_DB, PG_HOST, make_settings, wait_until
from .helpers import handles_sigterm, head
from .incidents import T0, incident_position, incident_rows, logged, sites_file, traffic

EVENTS = 12_000
LATER = 4_000
KILLS = 5


def _start(schema: str, sites: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": "pipeline_projector",
        "PIPELINE_POSTGRES_SCHEMA": schema,
        "PIPELINE_SITES_FILE": str(sites),
        "PIPELINE_PROJECTIONS_BATCH_SIZE": "40",
        "PIPELINE_PROJECTIONS_POLL_S": "0.2",
        "PIPELINE_INCIDENTS_METRICS_PORT": "0",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "incidents"], env=env, stdout=out, stderr=out
        )


def _write(store: EventStore, events: list[object], chunk: int) -> None:
    for i in range(0, len(events), chunk):
        store.write(events[i : i + chunk])  # type: ignore[arg-type]


async def test_incidents_survive_kill_9_and_equal_a_rebuild(pg_schema: str, tmp_path: Path) -> None:
    settings = make_settings("nats://unused", pg_schema)
    sites = sites_file(tmp_path)
    store = EventStore(settings.eventsourcing_env())
    log = tmp_path / "incidents.log"
    rng = random.Random(11)
    events = list(traffic(EVENTS, seed=5, start=T0))
    _write(store, events[: EVENTS - LATER], 1000)
    # The rest arrives while the process catches up and is killed.
    writer = threading.Thread(target=_write, args=(store, events[EVENTS - LATER :], 50))
    process = _start(pg_schema, sites, log)
    writer.start()
    killed_behind = 0
    resolved = 0
    try:
        for _ in range(KILLS):
            # Once this process has committed a batch, at a random point of the next ones.
            before = incident_position(pg_schema)
            await wait_until(lambda b=before: incident_position(pg_schema) > b, timeout_s=60)
            # An operator resolves an incident while the process runs.
            with psycopg.connect(
                host=PG_HOST, dbname=PG_DB, user="pipeline_api", autocommit=True
            ) as api:
                found = list_incidents(api, pg_schema, state="open", limit=1)
                if found:
                    resolve(api, pg_schema, uuid.UUID(found[0]["incident_id"]), "operator")
                    resolved += 1
            await asyncio.sleep(rng.uniform(0, 0.3))
            assert process.poll() is None, log.read_text()[-3000:]
            killed_behind += incident_position(pg_schema) < head(pg_schema)
            process.send_signal(signal.SIGKILL)
            process.wait()
            process = _start(pg_schema, sites, log)
        writer.join()
        await wait_until(lambda: incident_position(pg_schema) == head(pg_schema), timeout_s=180)
        # The last process may find nothing left to do before it has even started.
        await wait_until(lambda: handles_sigterm(process.pid), timeout_s=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        writer.join()
        store.close()
    assert killed_behind >= KILLS - 1, "the kills came after the process caught up"
    text = log.read_text()
    assert "Traceback" not in text
    assert text.count("replayed to position") == KILLS + 1

    recorded = logged(pg_schema)
    live = incident_rows(pg_schema)
    # Each decision once: by id, and by what it records.
    assert len({r[0] for r in recorded}) == len(recorded)
    opened = Counter(r[1] for r in recorded if r[2] == "IncidentOpened")
    assert len(live) == len(opened) > 20 and set(opened.values()) == {1}
    evidence = Counter((r[1], r[4]["event_id"]) for r in recorded if r[2] == "EvidenceAdded")
    assert set(evidence.values()) <= {1}
    # Each resolution was taken at its place: nothing joined its incident after it.
    assert resolved >= KILLS - 1
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        places = dict(
            conn.execute(
                f'SELECT incident_id, position FROM "{pg_schema}".incident_actions '
                "WHERE kind = 'Resolved'"
            ).fetchall()
        )
    assert len(places) == resolved
    assert [r for r in recorded if r[1] in places and r[3] > places[r[1]]] == []
    assert sum(row[-1] == "resolved" for row in live) == resolved
    # A rebuild from zero records nothing new and gives the same incidents.
    with psycopg.connect(
        host=PG_HOST, dbname=PG_DB, user="pipeline_projector", autocommit=True
    ) as conn:
        done = rebuild(conn, IncidentProcess(load_sites(sites), pg_schema))
    assert (done.replayed.new, done.replayed.missing) == (0, [])
    assert done.replayed.recorded == done.replayed.derived == len(recorded)
    assert logged(pg_schema) == recorded
    assert incident_rows(pg_schema) == live
