"""`/v1/security/...`: security events, their per-minute counts and totals."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter

from projections.queries import Page
from schemas import Severity

from ..auth import READ
from ..deps import Context, Cursor, Db, Limit, Since, Until

__all__ = ["router"]

router = APIRouter(prefix="/v1/security", tags=["security"], dependencies=READ)


@router.get("/events")
def security_events(
    api: Context,
    conn: Db,
    since: Since = None,
    until: Until = None,
    source: str | None = None,
    zone: str | None = None,
    kind: str | None = None,
    severity: Severity | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page:
    """Security events, the latest occurred first (`zone=` with no value: no zone)."""
    return api.queries.security_events(
        conn,
        since=since,
        until=until,
        source=source,
        zone=zone,
        kind=kind,
        severity=severity.value if severity else None,
        limit=limit,
        cursor=cursor,
    )


@router.get("/counts")
def security_counts(
    api: Context,
    conn: Db,
    since: Since = None,
    until: Until = None,
    zone: str | None = None,
    severity: Severity | None = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page:
    """Events per minute, severity and zone (zone "" for none), the latest minute first."""
    return api.queries.security_counts(
        conn,
        since=since,
        until=until,
        zone=zone,
        severity=severity.value if severity else None,
        limit=limit,
        cursor=cursor,
    )


@router.get("/totals")
def security_totals(
    api: Context,
    conn: Db,
    since: Since = None,
    until: Until = None,
    by: Literal["severity", "zone"] = "severity",
) -> list[dict[str, Any]]:
    """Events per severity (or zone) over a time range."""
    return api.queries.security_totals(conn, since=since, until=until, by=by)
