"""Helpers of the incident process's tests: a sites file, stored traffic that triggers its
rules, and reading the incident tables directly."""

from __future__ import annotations

import json
import random
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from nats.aio.client import Client

from pipeline.ingest.codec import decode
from pipeline.store.eventstore import Accepted
from schemas import Detection, Domain, FrameAnalyzedV1, FrameEncoding, FrameMetaV1, ModelProvenance
from streams import Subjects

from ..conftest import PG_DB, PG_HOST

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)  # a Monday, after the entrance's hours

SITES = """\
version: 1
correlation: {lateness: 60s, join_within: 90s, max_span: 10m, max_evidence: 20}
sites:
  hq:
    timezone: UTC
    zones:
      entrance:
        criticality: medium
        hours: {mon-fri: "07:00-20:00"}
        cameras: [cam-1]
        sources: [door-1, gate]
      vault:
        criticality: critical
        cameras: [cam-2]
        sources: [door-2]
      servers:
        criticality: high
        services: [auth]
rules:
  forced-door-with-person:
    type: correlate
    severity: high
    security: {kinds: [door.forced], min_severity: high}
    detection: {labels: [person], min_confidence: 0.5}
    window: {before: 30s, after: 30s}
  critical-security-event:
    type: single
    severity: critical
    security: {min_severity: critical}
  badge-rejected-burst:
    type: count
    severity: medium
    security: {kinds: [badge.rejected]}
    count: 3
    within: 60s
  service-down:
    type: single
    severity: high
    service: {statuses: [down]}
"""

_SUBJECTS = Subjects()
_MODEL = ModelProvenance(
    name="yolov8n",
    format="onnx",
    sha256="0" * 64,
    imgsz=640,
    conf=0.25,
    iou=0.45,
    classes=None,
    half=False,
    device="cpu",
)


def sites_file(folder: Path) -> Path:
    """The tests' sites file, written to `folder`."""
    path = folder / "sites.yaml"
    path.write_text(SITES)
    return path


def security(
    message_id: str, at: datetime, kind: str, severity: str, source: str, received: datetime
) -> Accepted:
    """A stored security event, as the worker stores it."""
    body = {
        "id": message_id,
        "source": source,
        "occurred_at": at.isoformat(),
        "kind": kind,
        "severity": severity,
        "attributes": {},
    }
    return _json(Domain.SECURITY, source, body, received)


def health(
    message_id: str, at: datetime, service: str, status: str, received: datetime
) -> Accepted:
    """A stored health report."""
    body = {
        "id": message_id,
        "service": service,
        "instance": f"{service}-0",
        "reported_at": at.isoformat(),
        "status": status,
        "checks": {"db": status},
    }
    return _json(Domain.MONITORING, service, body, received)


def frame_meta(
    message_id: str, at: datetime, camera: str, encoding: FrameEncoding = FrameEncoding.JPEG
) -> FrameMetaV1:
    """The metadata of a 640 x 480 frame (as its headers carry it)."""
    return FrameMetaV1(
        id=message_id,
        camera=camera,
        sequence=0,
        captured_at=at,
        width=640,
        height=480,
        encoding=encoding,
    )


async def publish_frame(nc: Client, meta: FrameMetaV1, body: bytes) -> int:
    """A frame published to the FRAMES stream as a camera sends it; its stream sequence."""
    subject = _SUBJECTS.subject(Domain.FRAMES, 1, meta.camera)
    ack = await nc.jetstream().publish(subject, body, headers=meta.to_headers())
    return int(ack.seq)


def frame(
    message_id: str,
    at: datetime,
    camera: str,
    found: list[tuple[str, float]],
    received: datetime,
    *,
    stream_seq: int = 1,
    encoding: FrameEncoding = FrameEncoding.JPEG,
) -> Accepted:
    """A stored analysed frame with these (label, confidence) detections."""
    meta = frame_meta(message_id, at, camera, encoding)
    payload = FrameAnalyzedV1(
        frame=meta,
        detections=tuple(
            Detection(class_id=i, label=label, confidence=c, box=(1.0, 2.0, 30.0, 40.0))
            for i, (label, c) in enumerate(found)
        ),
        inference_ms=5.0,
        batch_size=1,
        queue_ms=0.0,
        model=_MODEL,
    )
    return Accepted(
        domain=Domain.FRAMES,
        message_id=message_id,
        subject=_SUBJECTS.subject(Domain.FRAMES, 1, camera),
        stream_seq=stream_seq,
        schema_version=meta.schema_version,
        received_at=received,
        payload=payload.model_dump(mode="json"),
        event="FrameAnalyzed",
    )


def _json(domain: Domain, source: str, body: dict[str, Any], received: datetime) -> Accepted:
    subject = _SUBJECTS.subject(domain, 1, source)
    decoded = decode(_SUBJECTS, domain, subject, json.dumps(body).encode(), max_bytes=1 << 20)
    return Accepted(
        domain=domain,
        message_id=decoded.message_id,
        subject=subject,
        stream_seq=1,
        schema_version=decoded.schema_version,
        received_at=received,
        payload=decoded.payload,
    )


def traffic(
    count: int, *, seed: int, start: datetime = T0, step_s: float = 2.0
) -> Iterator[Accepted]:
    """`count` stored events that trigger every rule now and then: forced doors, people on
    cameras, rejected badges, tamper alarms and services down, captured up to 40 s out of
    order (within the sites file's lateness), received a second after capture."""
    rng = random.Random(seed)
    for n in range(count):
        now = start + timedelta(seconds=n * step_s)
        at = now - timedelta(seconds=rng.uniform(0, 40))
        received = now + timedelta(seconds=1)
        ident = f"{seed}-{n}"
        r = rng.random()
        if r < 0.12:
            source = rng.choice(["door-1", "door-2", "gate"])
            yield security(ident, at, "door.forced", "high", source, received)
        elif r < 0.30:
            source = rng.choice(["door-1", "gate"])
            yield security(ident, at, "badge.rejected", "low", source, received)
        elif r < 0.31:
            yield security(ident, at, "alarm.tamper", "critical", "door-2", received)
        elif r < 0.40:
            yield security(ident, at, "badge.accepted", "info", "door-1", received)
        elif r < 0.80:
            label = rng.choice(["person", "person", "car"])
            found = [(label, round(rng.uniform(0.3, 0.99), 2))] if rng.random() < 0.5 else []
            yield frame(
                str(uuid.uuid5(uuid.NAMESPACE_URL, ident)),
                at,
                rng.choice(["cam-1", "cam-2"]),
                found,
                received,
            )
        else:
            status = rng.choices(["ok", "degraded", "down"], weights=[85, 10, 5])[0]
            yield health(ident, at, "auth", status, received)


def owner() -> psycopg.Connection[Any]:
    """A connection as the database's owner."""
    return psycopg.connect(host=PG_HOST, dbname=PG_DB, user="postgres", autocommit=True)


def incident_rows(schema: str) -> list[tuple[Any, ...]]:
    """Every row of the incidents read model, sorted."""
    with owner() as conn:
        rows = conn.execute(f'SELECT * FROM "{schema}".incidents').fetchall()
    return sorted(rows, key=repr)


def logged(schema: str) -> list[tuple[Any, ...]]:
    """(event_id, incident_id, kind, position, data) of every decision recorded, in order."""
    with owner() as conn:
        return conn.execute(
            f"SELECT event_id, incident_id, kind, position, data "
            f'FROM "{schema}".incident_events ORDER BY position, seq'
        ).fetchall()


def incident_position(schema: str) -> int:
    """The incident process's recorded position (-1 before it started)."""
    with owner() as conn:
        row = conn.execute(
            f"SELECT position FROM \"{schema}\".projection_positions WHERE view = 'incidents'"
        ).fetchone()
    return int(row[0]) if row else -1


def boxed(stored: Accepted, *boxes: tuple[float, float, float, float]) -> Accepted:
    """A stored frame whose detections are at `boxes` (x1, y1, x2, y2 on 640 x 480)."""
    found = stored.payload["detections"]
    placed = [{**d, "box": list(box)} for d, box in zip(found, boxes, strict=True)]
    return replace(stored, payload={**stored.payload, "detections": placed})
