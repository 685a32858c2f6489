"""Queries over the views: filters, keyset pages (a cursor, never an offset) and aggregates.

Every list is ordered by a key that ends in a unique column; a page's cursor is the key
of its last row, and the next page starts after it, so pages stay consistent while
events keep arriving and cost the same however deep they go.

Rows come back JSON-ready: times in ISO 8601 with their offset, and `numeric` columns
(the metrics' exact sums) as decimal strings with every digit (`"14019849096961617"`),
which a JSON number read as a double would round.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg
from psycopg.rows import dict_row
from psycopg.sql import SQL, Composable, Identifier

__all__ = ["BadCursor", "Page", "Queries", "decode_cursor", "encode_cursor", "exact"]


class BadCursor(ValueError):
    """A cursor that this API did not hand out."""


@dataclass(frozen=True)
class Page:
    """One page of a list and the cursor of the next one (None on the last page)."""

    items: list[dict[str, Any]]
    next_cursor: str | None


def encode_cursor(values: Sequence[Any]) -> str:
    """The cursor of a row whose ordering key is `values`."""
    raw = json.dumps([v.isoformat() if isinstance(v, datetime) else v for v in values])
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, kinds: Sequence[type]) -> list[Any]:
    """The key values of a cursor, checked against their `kinds`; else `BadCursor`."""
    try:
        raw = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not isinstance(raw, list) or len(raw) != len(kinds):
            raise ValueError("wrong length")
        return [_check(v, kind) for v, kind in zip(raw, kinds, strict=True)]
    except (ValueError, TypeError) as exc:
        raise BadCursor(f"invalid cursor: {exc}") from None


def _check(value: Any, kind: type) -> Any:
    if kind is datetime:
        # A time without an offset would be read in the database session's time zone.
        at = datetime.fromisoformat(value)
        if at.tzinfo is None:
            raise ValueError("a time without its UTC offset")
        return at
    if kind is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ValueError(f"expected {kind.__name__}")
    return value


class _Filters:
    """WHERE clauses and their parameters, built up one optional filter at a time."""

    def __init__(self) -> None:
        self.clauses: list[Composable] = []
        self.params: list[Any] = []

    def equal(self, column: str, value: Any) -> None:
        if value is not None:
            self.clauses.append(SQL("{} = %s").format(Identifier(column)))
            self.params.append(value)

    def since(self, column: str, since: datetime | None, until: datetime | None) -> None:
        if since is not None:
            self.clauses.append(SQL("{} >= %s").format(Identifier(column)))
            self.params.append(since)
        if until is not None:
            self.clauses.append(SQL("{} < %s").format(Identifier(column)))
            self.params.append(until)

    def after(self, columns: Sequence[str], values: Sequence[Any] | None) -> None:
        """Rows after the cursor's key, for an order DESC on all `columns`."""
        if values is not None:
            names = SQL(", ").join(Identifier(c) for c in columns)
            marks = SQL(", ").join(SQL("%s") for _ in columns)
            self.clauses.append(SQL("({}) < ({})").format(names, marks))
            self.params.extend(values)

    def where(self) -> Composable:
        if not self.clauses:
            return SQL("")
        return SQL("WHERE ") + SQL(" AND ").join(self.clauses)


class Queries:
    """The API's queries on one schema's views."""

    def __init__(self, schema: str) -> None:
        self.schema = schema

    def _table(self, name: str) -> Composable:
        return SQL("{}.{}").format(Identifier(self.schema), Identifier(name))

    def _page(
        self,
        conn: psycopg.Connection[Any],
        table: str,
        columns: str,
        filters: _Filters,
        key: Sequence[str],
        limit: int,
    ) -> Page:
        order = SQL(", ").join(SQL("{} DESC").format(Identifier(c)) for c in key)
        query = SQL("SELECT {} FROM {} {} ORDER BY {} LIMIT %s").format(
            SQL(columns),  # the queries' own constant SQL
            self._table(table),
            filters.where(),
            order,
        )
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(query, [*filters.params, limit + 1], prepare=True)
            rows = curs.fetchall()
        more = len(rows) > limit
        rows = rows[:limit]
        cursor = encode_cursor([rows[-1][k] for k in key]) if more and rows else None
        return Page([_jsonable(r) for r in rows], cursor)

    # -- security ----------------------------------------------------------------------

    def security_events(
        self,
        conn: psycopg.Connection[Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        source: str | None = None,
        zone: str | None = None,
        kind: str | None = None,
        severity: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Security events, newest first (by when they occurred)."""
        f = _Filters()
        f.since("occurred_at", since, until)
        for column, value in (("source", source), ("kind", kind)):
            f.equal(column, value)
        if zone == "":  # as in the counts: "" is "no zone"
            f.clauses.append(SQL("zone IS NULL"))
        else:
            f.equal("zone", zone)
        f.equal("severity", severity)
        key = ("occurred_at", "position")
        f.after(key, decode_cursor(cursor, (datetime, int)) if cursor else None)
        return self._page(
            conn,
            "security_events",
            "position, event_id, message_id, source, kind, severity, zone, location, "
            "occurred_at, received_at, attributes",
            f,
            key,
            limit,
        )

    def security_counts(
        self,
        conn: psycopg.Connection[Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        zone: str | None = None,
        severity: str | None = None,
        limit: int = 1000,
        cursor: str | None = None,
    ) -> Page:
        """Events per minute, severity and zone, newest minute first."""
        f = _Filters()
        f.since("minute", since, until)
        f.equal("zone", zone)
        f.equal("severity", severity)
        key = ("minute", "severity", "zone")
        f.after(key, decode_cursor(cursor, (datetime, str, str)) if cursor else None)
        return self._page(conn, "security_counts", "minute, severity, zone, events", f, key, limit)

    def security_totals(
        self,
        conn: psycopg.Connection[Any],
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        by: str = "severity",
    ) -> list[dict[str, Any]]:
        """Events per severity or per zone over a time range."""
        if by not in ("severity", "zone"):
            raise ValueError("by must be severity or zone")
        f = _Filters()
        f.since("minute", since, until)
        query = SQL(
            "SELECT {by}, sum(events)::bigint AS events FROM {t} {w} GROUP BY {by} ORDER BY {by}"
        )
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(
                query.format(by=Identifier(by), t=self._table("security_counts"), w=f.where()),
                f.params,
            )
            return [_jsonable(r) for r in curs.fetchall()]

    # -- service health ----------------------------------------------------------------

    def services(
        self,
        conn: psycopg.Connection[Any],
        *,
        service: str | None = None,
        status: str | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Current status of each service instance."""
        f = _Filters()
        f.equal("service", service)
        f.equal("status", status)
        key = ("service", "instance")
        f.after(key, decode_cursor(cursor, (str, str)) if cursor else None)
        return self._page(
            conn,
            "service_status",
            "service, instance, status, since, reported_at, message, checks, reports, position",
            f,
            key,
            limit,
        )

    def service(
        self, conn: psycopg.Connection[Any], service: str, instance: str
    ) -> dict[str, Any] | None:
        """One instance's status and the last report's checks, as `services` lists them, or
        None; `earlier_checks` adds each check that earlier reports named and the last one
        did not, in the state it was last reported (with when and at which position)."""
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(
                SQL(
                    "SELECT service, instance, status, since, reported_at, message, checks, "
                    "reports, position FROM {} WHERE service = %s AND instance = %s"
                ).format(self._table("service_status")),
                (service, instance),
            )
            row = curs.fetchone()
            if row is None:
                return None
            # A check of the last report was stored at its position; any other, before it.
            curs.execute(
                SQL(
                    "SELECT name, status, latency_ms, detail, reported_at, position FROM {} "
                    "WHERE service = %s AND instance = %s AND position < %s ORDER BY name"
                ).format(self._table("service_checks")),
                (service, instance, row["position"]),
            )
            result = _jsonable(row)
            result["earlier_checks"] = [_jsonable(r) for r in curs.fetchall()]
            return result

    def transitions(
        self,
        conn: psycopg.Connection[Any],
        *,
        service: str | None = None,
        instance: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 100,
        cursor: str | None = None,
    ) -> Page:
        """Status changes, the last stored first."""
        f = _Filters()
        f.equal("service", service)
        f.equal("instance", instance)
        f.since("at", since, until)
        key = ("position",)
        f.after(key, decode_cursor(cursor, (int,)) if cursor else None)
        return self._page(
            conn,
            "service_transitions",
            "position, service, instance, from_status, to_status, at",
            f,
            key,
            limit,
        )

    def status_totals(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        """Instances per current status."""
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(
                SQL(
                    "SELECT status, count(*) AS instances FROM {} GROUP BY status ORDER BY status"
                ).format(self._table("service_status"))
            )
            return [_jsonable(r) for r in curs.fetchall()]

    # -- metrics -----------------------------------------------------------------------

    def rollups(
        self,
        conn: psycopg.Connection[Any],
        *,
        service: str | None = None,
        instance: str | None = None,
        name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        cursor: str | None = None,
    ) -> Page:
        """Per-minute rollups, the newest minute first."""
        f = _Filters()
        f.equal("service", service)
        f.equal("instance", instance)
        f.equal("name", name)
        f.since("minute", since, until)
        key = ("minute", "service", "instance", "name", "labels_hash")
        f.after(key, decode_cursor(cursor, (datetime, str, str, str, str)) if cursor else None)
        return self._page(
            conn,
            "metric_rollups",
            "minute, service, instance, name, labels_hash, labels, samples, "
            "sum, min, max, last, last_at",
            f,
            key,
            limit,
        )

    def metric_totals(
        self,
        conn: psycopg.Connection[Any],
        *,
        name: str,
        service: str | None = None,
        instance: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> list[dict[str, Any]]:
        """One metric over a time range, per service, instance and label set."""
        f = _Filters()
        f.equal("name", name)
        f.equal("service", service)
        f.equal("instance", instance)
        f.since("minute", since, until)
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(
                SQL(
                    "SELECT service, instance, labels, sum(samples)::bigint AS samples, "
                    "sum(sum) AS sum, min(min) AS min, max(max) AS max, "
                    "(array_agg(last ORDER BY last_at DESC))[1] AS last, max(last_at) AS last_at "
                    "FROM {} {} GROUP BY service, instance, labels_hash, labels "
                    "ORDER BY service, instance, labels_hash"
                ).format(self._table("metric_rollups"), f.where()),
                f.params,
            )
            return [_jsonable(r) for r in curs.fetchall()]

    # -- cameras -----------------------------------------------------------------------

    def cameras(self, conn: psycopg.Connection[Any]) -> list[dict[str, Any]]:
        """Every camera's activity."""
        with conn.cursor(row_factory=dict_row) as curs:
            curs.execute(
                SQL(
                    "SELECT camera, frames_analysed, frames_skipped, detections, "
                    "CASE WHEN frames_analysed > 0 THEN "
                    "(inference_ms_sum / frames_analysed)::float8 END AS mean_inference_ms, "
                    "last_frame_at, model_name, model_sha256, position FROM {} ORDER BY camera"
                ).format(self._table("camera_activity"))
            )
            return [_jsonable(r) for r in curs.fetchall()]

    def detections(
        self,
        conn: psycopg.Connection[Any],
        *,
        camera: str | None = None,
        label: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = 1000,
        cursor: str | None = None,
    ) -> Page:
        """Detections per camera, label and minute, the newest minute first."""
        f = _Filters()
        f.equal("camera", camera)
        f.equal("label", label)
        f.since("minute", since, until)
        key = ("minute", "camera", "label")
        f.after(key, decode_cursor(cursor, (datetime, str, str)) if cursor else None)
        return self._page(
            conn, "camera_detections", "minute, camera, label, detections, frames", f, key, limit
        )


def _jsonable(row: dict[str, Any]) -> dict[str, Any]:
    return {k: _json_value(v) for k, v in row.items()}


def _json_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, Decimal):
        return exact(value)
    return value


def exact(value: Decimal) -> str:
    """A decimal as a string with all its digits, no exponent and no trailing zeros."""
    digits = format(value, "f")  # exact: `normalize()` would round to the context's 28 digits
    return digits.rstrip("0").rstrip(".") if "." in digits else digits
