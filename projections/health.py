"""Service health: the current status of each service instance, its checks, and transitions."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL

from pipeline.store.domain import HealthReport
from pipeline.store.reader import Positioned

from .view import Table, Tables, View, copy_rows, json, parse_time, text, upsert

__all__ = ["HealthView"]

_STATUS = (
    "service",
    "instance",
    "status",
    "since",
    "reported_at",
    "message",
    "checks",
    "reports",
    "position",
)
_CHECK = (
    "service",
    "instance",
    "name",
    "status",
    "latency_ms",
    "detail",
    "reported_at",
    "position",
)
_TRANSITION = ("position", "service", "instance", "from_status", "to_status", "at")


class HealthView(View):
    """Reports in the order they were stored: the latest one stored is the current status."""

    name = "health"
    description = "current status and checks of every service instance; status transitions"
    events = (HealthReport.Recorded,)
    tables = (
        Table(
            "service_status",
            "service text NOT NULL, instance text NOT NULL, status text NOT NULL, "
            "since timestamptz NOT NULL, reported_at timestamptz NOT NULL, message text, "
            "checks jsonb NOT NULL, reports bigint NOT NULL, position bigint NOT NULL, "
            "PRIMARY KEY (service, instance)",
            indexes=("status, service, instance",),
        ),
        Table(
            "service_checks",
            "service text NOT NULL, instance text NOT NULL, name text NOT NULL, "
            "status text NOT NULL, latency_ms double precision, detail text, "
            "reported_at timestamptz NOT NULL, position bigint NOT NULL, "
            "PRIMARY KEY (service, instance, name)",
        ),
        Table(
            "service_transitions",
            "position bigint PRIMARY KEY, service text NOT NULL, instance text NOT NULL, "
            "from_status text, to_status text NOT NULL, at timestamptz NOT NULL",
            indexes=("service, instance, position DESC", "at DESC, position DESC"),
        ),
    )

    def apply(self, curs: psycopg.Cursor[Any], tables: Tables, batch: Sequence[Positioned]) -> None:
        """Follow each instance's status through the batch; write what changed."""
        instances = sorted(
            {(i.event.payload["service"], i.event.payload["instance"]) for i in batch}
        )
        current: dict[tuple[str, str], list[Any]] = {}
        with curs.connection.cursor(row_factory=tuple_row) as read:
            read.execute(
                SQL(
                    "SELECT service, instance, status, since, reports FROM {} "
                    "WHERE (service, instance) IN (SELECT * FROM unnest(%s::text[], %s::text[]))"
                ).format(tables["service_status"]),
                ([s for s, _ in instances], [i for _, i in instances]),
            )
            for service, instance, status, since, reports in read.fetchall():
                current[(service, instance)] = [status, since, reports]
        status_rows: dict[tuple[str, str], tuple[Any, ...]] = {}
        check_rows: dict[tuple[str, str, str], tuple[Any, ...]] = {}
        transitions = []
        for item in batch:
            p = item.event.payload
            key = (p["service"], p["instance"])
            at = parse_time(p["reported_at"])
            before = current.get(key)
            if before is None or before[0] != p["status"]:
                transitions.append(
                    (item.position, *key, before[0] if before else None, p["status"], at)
                )
                before = current[key] = [p["status"], at, 0]
            before[2] += 1
            checks = p.get("checks") or []
            status_rows[key] = (
                *key,
                p["status"],
                before[1],
                at,
                text(p.get("message")),
                json(checks),
                before[2],
                item.position,
            )
            for check in checks:
                check_name = text(check["name"]) or ""
                check_rows[(*key, check_name)] = (
                    *key,
                    check_name,
                    check["status"],
                    check.get("latency_ms"),
                    text(check.get("detail")),
                    at,
                    item.position,
                )
        update_all = ", ".join(f"{c} = excluded.{c}" for c in _STATUS[2:])
        upsert(
            curs,
            tables,
            "service_status",
            _STATUS,
            ("service", "instance"),
            update_all,
            list(status_rows.values()),
        )
        upsert(
            curs,
            tables,
            "service_checks",
            _CHECK,
            ("service", "instance", "name"),
            ", ".join(f"{c} = excluded.{c}" for c in _CHECK[3:]),
            list(check_rows.values()),
        )
        copy_rows(curs, tables["service_transitions"], _TRANSITION, transitions)
