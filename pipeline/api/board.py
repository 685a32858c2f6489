"""What the live dashboard shows, read from the views and the store as JSON-ready sections.

`Board.sections` answers every section at once (unresolved incidents with their evidence,
cameras, security events by severity and zone, service health, projection lag);
`Board.changes` what was stored in a range of positions (counts per domain and the last
events, summarised); `Board.fingerprint` a cheap digest of what the sections depend on,
so the follower reads them again only when it moved. A section whose tables do not exist
yet (no projections process has started) is `{"ready": false}`.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import psycopg
from psycopg.rows import dict_row, tuple_row
from psycopg.sql import SQL, Composed, Identifier

from projections.incidents.observations import DetectionSeen, SecuritySeen, ServiceSeen, observe
from projections.incidents.queries import LEVELS, list_incidents
from projections.queries import Queries
from projections.status import view_status
from schemas import Domain, FrameAnalyzedV1

from ..store.domain import CameraFrame, domain_of, domain_topics
from ..store.reader import EventReader, Positioned

__all__ = ["Board", "summarise"]

INCIDENTS_SHOWN = 20
EVIDENCE_SHOWN = 10
LAST_EVENTS = 20
"""The events a change (or a resume) carries in full; the rest are counted."""

_COLUMNS = "notification_id, originator_id, originator_version, topic, state"


class Board:
    """The dashboard's reads on one schema (each given the caller's connection)."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.reader = EventReader(schema)
        self.queries = Queries(schema)
        s = Identifier(schema)
        self._positions: Composed = SQL("{}.projection_positions").format(s)
        self._incidents: Composed = SQL("{}.incidents").format(s)
        self._topics = {t: d.value for d in Domain for t in domain_topics(d)}
        table = self.reader.table
        self._counts = SQL(
            "SELECT topic, count(*) FROM {} WHERE notification_id > %s AND notification_id <= %s "
            "GROUP BY topic"
        ).format(table)
        self._last = SQL(
            "SELECT {} FROM {} WHERE notification_id > %s AND notification_id <= %s "
            "ORDER BY notification_id DESC LIMIT %s"
        ).format(SQL(_COLUMNS), table)
        self._at = SQL("SELECT {} FROM {} WHERE notification_id = ANY(%s)").format(
            SQL(_COLUMNS), table
        )
        self._ids = SQL("SELECT {} FROM {} WHERE originator_id = ANY(%s)").format(
            SQL(_COLUMNS), table
        )

    def table(self, name: str) -> Composed:
        """A table of the schema."""
        return SQL("{}.{}").format(Identifier(self.schema), Identifier(name))

    # -- what moved --------------------------------------------------------------------

    def fingerprint(self, conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
        """The store's head, every view's position and state, the incidents' counts: equal
        fingerprints, equal sections (but for the windows of the last hour and day)."""
        parts: list[Any] = [self.reader.head(conn)]
        for query in (
            SQL("SELECT view, position, state FROM {} ORDER BY view").format(self._positions),
            SQL(
                "SELECT count(*), count(*) FILTER (WHERE state = 'open'), "
                "count(*) FILTER (WHERE state = 'resolved'), max(updated_position) FROM {}"
            ).format(self._incidents),
        ):
            parts.append(_optional(partial(_all, conn, query), None))
        return tuple(parts)

    def changes(self, conn: psycopg.Connection[Any], after: int, upto: int) -> dict[str, Any]:
        """What was stored at positions in (after, upto]: `stored`, the events per domain,
        and `events`, the last `LAST_EVENTS` of them summarised, oldest first."""
        stored: dict[str, int] = {}
        if upto > after:
            with conn.cursor(binary=True, row_factory=tuple_row) as curs:
                for topic, count in curs.execute(self._counts, (after, upto)).fetchall():
                    domain = self._topics.get(topic, "other")
                    stored[domain] = stored.get(domain, 0) + int(count)
                rows = curs.execute(self._last, (after, upto, LAST_EVENTS)).fetchall()
            events = [summarise(e) for e in self.reader.decode(reversed(rows))]
        else:
            events = []
        return {"after": after, "position": upto, "stored": stored, "events": events}

    def recent(self, conn: psycopg.Connection[Any], upto: int) -> list[dict[str, Any]]:
        """The last `LAST_EVENTS` events stored at or before `upto`, summarised, oldest first."""
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            rows = curs.execute(self._last, (0, upto, LAST_EVENTS)).fetchall()
        return [summarise(e) for e in self.reader.decode(reversed(rows))]

    # -- the sections ------------------------------------------------------------------

    def sections(
        self, conn: psycopg.Connection[Any], names: Iterable[str] | None = None
    ) -> dict[str, Any]:
        """Every section of the dashboard (or those `names`), as it stands."""
        reads: dict[str, Callable[[], Any]] = {
            "incidents": lambda: self.incidents(conn),
            "cameras": lambda: self.cameras(conn),
            "security": lambda: self.security(conn),
            "services": lambda: self.services(conn),
            "lag": lambda: {"ready": True, "views": self.lag(conn)},
        }
        wanted = reads if names is None else [n for n in reads if n in set(names)]
        return {name: _optional(reads[name]) for name in wanted}

    def incidents(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Unresolved incidents, graver first (level, then score, then newest), each with
        its last evidence summarised; and how many are open per level."""
        found = [
            *list_incidents(conn, self.schema, state="open", limit=INCIDENTS_SHOWN),
            *list_incidents(conn, self.schema, state="acknowledged", limit=INCIDENTS_SHOWN),
        ]
        rank = {level: n for n, level in enumerate(LEVELS)}
        found.sort(key=lambda i: str(i["opened_at"]), reverse=True)  # newest first, then
        found.sort(key=lambda i: (-rank.get(i["level"], -1), -i["score"]))
        found = found[:INCIDENTS_SHOWN]
        wanted = [uuid.UUID(e) for i in found for e in i["evidence"][-EVIDENCE_SHOWN:]]
        events = {str(p.event.originator_id): summarise(p) for p in self._by_id(conn, wanted)}
        for incident in found:
            incident["evidence_shown"] = [
                events[e] for e in incident["evidence"][-EVIDENCE_SHOWN:] if e in events
            ]
        per_level = conn.execute(
            SQL("SELECT level, count(*) FROM {} WHERE state = 'open' GROUP BY level").format(
                self._incidents
            )
        ).fetchall()
        return {"ready": True, "items": found, "open_by_level": dict(per_level)}

    def cameras(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Every camera: its counts, the last analysed frame's detections (with boxes), and
        the last hour's detections per label and per minute (`minutes[0]`: this minute)."""
        cameras = self.queries.cameras(conn)
        with conn.cursor(row_factory=tuple_row) as curs:
            positions = [
                p
                for (p,) in curs.execute(
                    SQL("SELECT model_position FROM {} WHERE model_position IS NOT NULL").format(
                        self.table("camera_activity")
                    )
                ).fetchall()
            ]
            rows = curs.execute(self._at, (positions,)).fetchall()
            labels = curs.execute(
                SQL(
                    "SELECT camera, label, sum(detections)::bigint FROM {} "
                    "WHERE minute > now() - interval '1 hour' GROUP BY camera, label "
                    "ORDER BY camera, label"
                ).format(self.table("camera_detections"))
            ).fetchall()
            minutes = curs.execute(
                SQL(
                    "SELECT camera, floor(extract(epoch FROM now() - minute) / 60)::int, "
                    "sum(detections)::bigint FROM {} WHERE minute > now() - interval '1 hour' "
                    "GROUP BY 1, 2"
                ).format(self.table("camera_detections"))
            ).fetchall()
        last = {}
        for item in self.reader.decode(rows):
            if isinstance(item.event, CameraFrame.FrameAnalyzed):
                frame = FrameAnalyzedV1.model_validate(item.event.payload)
                last[frame.frame.camera] = {
                    "position": item.position,
                    "captured_at": frame.frame.captured_at.isoformat(),
                    "width": frame.frame.width,
                    "height": frame.frame.height,
                    "detections": [
                        {"label": d.label, "confidence": d.confidence, "box": list(d.box)}
                        for d in frame.detections
                    ],
                }
        for camera in cameras:
            name = camera["camera"]
            camera["last_frame"] = last.get(name)
            camera["last_hour"] = {label: int(n) for c, label, n in labels if c == name}
            series = [0] * 60
            for c, ago, n in minutes:
                if c == name and 0 <= ago < 60:
                    series[ago] += int(n)
            camera["minutes"] = series
        return {"ready": True, "items": cameras}

    def security(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Security events of the last 24 hours per zone and severity, and the latest ones."""
        with conn.cursor(row_factory=dict_row) as curs:
            counts = curs.execute(
                SQL(
                    "SELECT zone, severity, sum(events)::bigint AS events FROM {} "
                    "WHERE minute > now() - interval '24 hours' GROUP BY zone, severity "
                    "ORDER BY zone, severity"
                ).format(self.table("security_counts"))
            ).fetchall()
        latest = self.queries.security_events(conn, limit=8).items
        return {"ready": True, "counts": counts, "latest": latest}

    def services(self, conn: psycopg.Connection[Any]) -> dict[str, Any]:
        """Every service instance's status, and instances per status."""
        return {
            "ready": True,
            "items": self.queries.services(conn, limit=200).items,
            "totals": self.queries.status_totals(conn),
        }

    def lag(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        """Each view's (and the incident process's) position and lag behind the store."""
        return [s.as_json() for s in view_status(conn, self.schema)]

    def _by_id(self, conn: psycopg.Connection[Any], ids: Iterable[uuid.UUID]) -> list[Positioned]:
        wanted = list(ids)
        if not wanted:
            return []
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            rows = curs.execute(self._ids, (wanted,)).fetchall()
        return self.reader.decode(sorted(rows))


def summarise(item: Positioned) -> dict[str, Any]:
    """A stored event as the dashboard lists it: position, domain, kind, what and where."""
    event = item.event
    summary: dict[str, Any] = {
        "position": item.position,
        "event_id": str(event.originator_id),
        "domain": domain_of(event).value,
        "event": type(event).__name__,
        "received_at": event.timestamp.isoformat(),
    }
    seen = observe(item)
    if isinstance(seen, SecuritySeen):
        summary.update(
            at=seen.at.isoformat(),
            source=seen.source,
            kind=seen.kind,
            severity=seen.severity.value,
            zone=seen.zone,
        )
    elif isinstance(seen, DetectionSeen):
        summary.update(
            at=seen.at.isoformat(),
            camera=seen.camera,
            detections=[{"label": label, "confidence": c} for label, c in seen.detections],
        )
    elif isinstance(seen, ServiceSeen):
        summary.update(
            at=seen.at.isoformat(),
            service=seen.service,
            instance=seen.instance,
            status=seen.status.value,
        )
    else:
        payload = event.payload if isinstance(event.payload, dict) else {}
        frame = payload.get("frame")
        if isinstance(frame, dict):
            summary.update(camera=frame.get("camera"), reason=payload.get("reason"))
        else:
            summary.update(service=payload.get("service"), instance=payload.get("instance"))
    return summary


def _all(conn: psycopg.Connection[Any], query: Composed) -> list[tuple[Any, ...]]:
    with conn.cursor(row_factory=tuple_row) as curs:
        return curs.execute(query).fetchall()


def _optional(read: Callable[[], Any], missing: Any = None) -> Any:
    """What `read` answers, or `missing` (`{"ready": false}` if not given) when its tables
    do not exist yet."""
    try:
        return read()
    except psycopg.errors.UndefinedTable:
        return {"ready": False} if missing is None else missing
