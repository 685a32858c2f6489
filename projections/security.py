"""Security events: every event, searchable, and counts per minute, severity and zone."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.sql import SQL

from pipeline.store.domain import SecurityEvent
from pipeline.store.reader import Positioned

from .view import Table, Tables, View, copy_rows, json_as_sent, parse_time, text

__all__ = ["SecurityView"]

_COLUMNS = (
    "position",
    "event_id",
    "message_id",
    "source",
    "kind",
    "severity",
    "zone",
    "location",
    "occurred_at",
    "received_at",
    "attributes",
)


class SecurityView(View):
    """`security_events`: one row per event; `security_counts`: per minute, severity, zone."""

    name = "security"
    description = "security events by time, source, zone, kind and severity; counts per minute"
    events = (SecurityEvent.Recorded,)
    tables = (
        Table(
            "security_events",
            "position bigint PRIMARY KEY, event_id uuid NOT NULL, message_id text NOT NULL, "
            "source text NOT NULL, kind text NOT NULL, severity text NOT NULL, zone text, "
            "location text, occurred_at timestamptz NOT NULL, "
            "received_at timestamptz NOT NULL, attributes json NOT NULL",
            indexes=(
                "occurred_at DESC, position DESC",
                "source, occurred_at DESC, position DESC",
                "zone, occurred_at DESC, position DESC",
                "severity, occurred_at DESC, position DESC",
            ),
        ),
        Table(
            "security_counts",
            "minute timestamptz NOT NULL, severity text NOT NULL, zone text NOT NULL, "
            "events bigint NOT NULL, PRIMARY KEY (minute, severity, zone)",
        ),
    )

    def apply(self, curs: psycopg.Cursor[Any], tables: Tables, batch: Sequence[Positioned]) -> None:
        """Append the events, then add them to the per-minute counts."""
        rows = []
        for item in batch:
            event = item.event
            p = event.payload
            rows.append(
                (
                    item.position,
                    event.originator_id,
                    event.message_id,
                    p["source"],
                    p["kind"],
                    p["severity"],
                    text(p.get("zone")),
                    text(p.get("location")),
                    parse_time(p["occurred_at"]),
                    event.timestamp,
                    json_as_sent(p.get("attributes") or {}),
                )
            )
        copy_rows(curs, tables["security_events"], _COLUMNS, rows)
        # Counted from the rows just written, in the same transaction.
        curs.execute(
            SQL(
                "INSERT INTO {counts} AS t (minute, severity, zone, events) "
                "SELECT date_trunc('minute', occurred_at, 'UTC'), severity, coalesce(zone, ''), "
                "count(*) "
                "FROM {events} WHERE position BETWEEN %s AND %s GROUP BY 1, 2, 3 "
                "ON CONFLICT (minute, severity, zone) "
                "DO UPDATE SET events = t.events + excluded.events"
            ).format(counts=tables["security_counts"], events=tables["security_events"]),
            (batch[0].position, batch[-1].position),
        )
