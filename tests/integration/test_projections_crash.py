"""Kill -9 the projections process at random points: the views equal a rebuild from zero."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import subprocess
import sys
import threading
from pathlib import Path

import psycopg

from pipeline.store.eventstore import EventStore
from projections import VIEWS
from projections.rebuild import rebuild

from ..conftest import PG_DB, PG_HOST, make_settings, wait_until
from .helpers import handles_sigterm, positions, view_rows, views_current, write_events

EVENTS = 50_000
KILLS = 5
BACKLOG = 10_000
"""Events written while each killed process is down: more than the next takes in before its kill."""


def _start(schema: str, log: Path) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": "pipeline_projector",
        "PIPELINE_POSTGRES_SCHEMA": schema,
        "PIPELINE_PROJECTIONS_BATCH_SIZE": "700",
        "PIPELINE_PROJECTIONS_POLL_S": "0.5",
        "PIPELINE_PROJECTIONS_METRICS_PORT": "0",
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "projections"],
            env=env,
            stdout=out,
            stderr=out,
        )


async def test_views_survive_kill_9_and_equal_a_rebuild(pg_schema: str, tmp_path: Path) -> None:
    settings = make_settings("nats://unused", pg_schema)
    store = EventStore(settings.eventsourcing_env())
    log = tmp_path / "projections.log"
    rng = random.Random(7)
    write_events(store, EVENTS - 5000, seed=1, chunk=1000)
    # The rest arrives while the process catches up and is killed.
    writer = threading.Thread(
        target=write_events, args=(store, 5000), kwargs={"seed": 2, "chunk": 100}
    )
    process = _start(pg_schema, log)
    writer.start()
    killed_behind = 0
    try:
        for kill in range(KILLS):
            # Once this process has committed a batch, at a random point of the next ones.
            before = sum(p for p, _ in positions(pg_schema).values())
            await wait_until(
                lambda b=before: sum(p for p, _ in positions(pg_schema).values()) > b,
                timeout_s=60,
            )
            await asyncio.sleep(rng.uniform(0, 0.3))
            assert process.poll() is None, log.read_text()[-3000:]
            killed_behind += not views_current(pg_schema)
            process.send_signal(signal.SIGKILL)
            process.wait()
            # While it is down, more arrives than the next one takes in before its kill
            # (the views take events in faster than they are written).
            write_events(store, BACKLOG, seed=10 + kill, chunk=1000)
            process = _start(pg_schema, log)
        writer.join()
        await wait_until(lambda: views_current(pg_schema), timeout_s=180)
        # The last process may find nothing left to do before it has even started.
        await wait_until(lambda: handles_sigterm(process.pid), timeout_s=30)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()[-3000:]
    finally:
        if process.poll() is None:
            process.kill()
        writer.join()
        store.close()
    assert killed_behind >= KILLS - 1, "the kills came after the views caught up"
    assert "Traceback" not in log.read_text()

    live = {name: view_rows(pg_schema, cls) for name, cls in VIEWS.items()}
    with psycopg.connect(
        host=PG_HOST, dbname=PG_DB, user="pipeline_projector", autocommit=True
    ) as conn:
        security = conn.execute(
            f'SELECT count(*) FROM "{pg_schema}".journal_events '
            "WHERE topic LIKE '%SecurityEvent.Recorded'"
        ).fetchone()
        for name, cls in VIEWS.items():
            rebuild(conn, pg_schema, cls())
            assert view_rows(pg_schema, cls) == live[name], f"view {name}"
    assert security is not None and len(live["security"]["security_events"]) == security[0]
