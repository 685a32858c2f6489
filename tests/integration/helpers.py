"""Helpers for integration tests: reading the event store and the DLQ directly."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from pipeline.ops.migrate import migrate
from pipeline.settings import Settings
from pipeline.store.domain import event_id
from pipeline.store.eventstore import EventStore
from schemas import Domain

from ..conftest import PG_DB, PG_HOST, as_role, make_settings


def stored_rows(schema: str) -> list[tuple[uuid.UUID, int, str, dict[str, Any]]]:
    """(originator_id, version, topic, state) of every stored event."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        rows = conn.execute(
            f'SELECT originator_id, originator_version, topic, state FROM "{schema}".journal_events'
        ).fetchall()
    return [(r[0], r[1], r[2], json.loads(bytes(r[3]))) for r in rows]


def stored_ids(schema: str) -> Counter[uuid.UUID]:
    """How many stored events each id has (1 everywhere when nothing is duplicated)."""
    try:
        return Counter(row[0] for row in stored_rows(schema))
    except psycopg.errors.UndefinedTable:  # no worker has created it yet
        return Counter()


def ids_of(domain: Domain, message_ids: list[str]) -> set[uuid.UUID]:
    """Stored event ids of the given message ids."""
    return {event_id(domain, m) for m in message_ids}


def body_digest(letter: Any) -> str:
    """SHA-256 of the body a dead letter was written for: a letter whose body was left out
    (over PIPELINE_DEAD_LETTER_MAX_BODY_BYTES) keeps its digest."""
    if letter.body_sha256:
        return str(letter.body_sha256)
    return hashlib.sha256(letter.body).hexdigest()


def security_body(message_id: str, **changes: Any) -> bytes:
    """A valid v1 security event."""
    body = {
        "id": message_id,
        "source": "door-7",
        "occurred_at": "2026-11-27T10:00:00+01:00",
        "kind": "door.forced",
        "severity": "high",
        "zone": "north",
        "attributes": {"badge": "B1234"},
        **changes,
    }
    return json.dumps(body).encode()


def write_events(store: Any, count: int, *, seed: int, chunk: int = 500) -> list[Any]:
    """Store `count` generated messages (all four domains) in batches; returns them."""
    from pipeline.ops.simulate import stored_events

    events = list(stored_events(count, seed=seed))
    for i in range(0, len(events), chunk):
        store.write(events[i : i + chunk])
    return events


def handles_sigterm(pid: int) -> bool:
    """Whether the process has put in its own SIGTERM handler (Linux: the `SigCgt` mask of
    /proc/PID/status). A SIGTERM sent before then, while it still imports, ends it at
    once (status -15) rather than through its graceful stop."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGTERM - 1) & 1)
    return False


def view_rows(schema: str, view: Any, suffix: str = "") -> dict[str, list[tuple[Any, ...]]]:
    """Every row of each of a view's tables, sorted: for comparing two builds of a view."""
    result = {}
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        for table in view.tables:
            rows = conn.execute(f'SELECT * FROM "{schema}"."{table.name}{suffix}"').fetchall()
            result[table.name] = sorted(rows, key=repr)
    return result


def positions(schema: str) -> dict[str, tuple[int, str]]:
    """Each view's (position, state)."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        try:
            rows = conn.execute(
                f'SELECT view, position, state FROM "{schema}".projection_positions'
            ).fetchall()
        except psycopg.errors.UndefinedTable:
            return {}
    return {view: (position, state) for view, position, state in rows}


def head(schema: str) -> int:
    """The position of the last stored event."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
        row = conn.execute(
            f'SELECT coalesce(max(notification_id), 0) FROM "{schema}".journal_events'
        ).fetchone()
    return int(row[0]) if row else 0


def views_current(schema: str, names: Any = None) -> bool:
    """Whether every view (or those named) is at the head of the store."""
    from projections import VIEWS

    at = positions(schema)
    top = head(schema)
    return all(at.get(name, (-1, ""))[0] == top for name in (names or VIEWS))


def frames_settings(nats_url: str, schema: str, model_dir: Path, **overrides: object) -> Settings:
    """A worker of frames only, on the test model (random weights, 320 px)."""
    values: dict[str, object] = {
        "domains": (Domain.FRAMES,),
        "detector_model": str(model_dir / "yolov8n.onnx"),
        "detector_imgsz": 320,
        "detector_conf": 1e-5,  # random weights: keep their faint boxes
        "detector_num_cpus": 0.5,
        "detector_max_wait_ms": 20,
        **overrides,
    }
    return make_settings(nats_url, schema, **values)


def start_worker(
    nats_url: str, schema: str, log: Path, extra: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`pipeline run worker` of the three event domains on `schema`, as the writer role,
    with small batches and a 2 s ack wait; its output appended to `log`."""
    env = {
        **os.environ,
        "PIPELINE_NATS_URL": nats_url,
        "PIPELINE_POSTGRES_HOST": PG_HOST,
        "PIPELINE_POSTGRES_DBNAME": PG_DB,
        "PIPELINE_POSTGRES_USER": "pipeline_writer",
        "PIPELINE_POSTGRES_SCHEMA": schema,
        "PIPELINE_BATCH_SIZE": "64",
        "PIPELINE_BATCH_TIMEOUT_S": "0.02",
        "PIPELINE_ACK_WAIT_S": "2",
        "PIPELINE_METRICS_PORT": "0",
        "PIPELINE_DOMAINS": '["security", "monitoring", "metrics"]',
        **(extra or {}),
    }
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "pipeline", "run", "worker"], env=env, stdout=out, stderr=out
        )


def count_events(schema: str) -> int:
    """The events stored in `schema` (0 before the store's tables exist)."""
    try:
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres") as conn:
            row = conn.execute(f'SELECT count(*) FROM "{schema}".journal_events').fetchone()
    except psycopg.errors.UndefinedTable:
        return 0
    assert row is not None
    return int(row[0])


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    """SIGTERM, and SIGKILL if it has not exited 30 s later."""
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(30)
    except subprocess.TimeoutExpired:
        worker.kill()


@contextlib.contextmanager
def writer_store(schema: str) -> Iterator[EventStore]:
    """An `EventStore` as the writer role on `schema`, migrated afresh; dropped after."""
    with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
        conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    configured = make_settings("nats://unused", schema)
    migrate(configured)
    store = EventStore(as_role(configured, "writer").eventsourcing_env())
    try:
        yield store
    finally:
        store.close()
        with psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
