"""`/v1/services/...`: each service instance's current status, totals and status changes."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from projections.queries import Page
from schemas.monitoring import HealthStatus

from ..auth import READ
from ..deps import Context, Cursor, Db, Limit, Since, Until
from ..errors import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/services", tags=["services"], dependencies=READ)


@router.get("")
def services(
    api: Context,
    conn: Db,
    service: str | None = None,
    status: HealthStatus | None = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page:
    """The current status of every service instance, with its last report's checks."""
    return api.queries.services(
        conn,
        service=service,
        status=status.value if status else None,
        limit=limit,
        cursor=cursor,
    )


@router.get("/totals")
def service_totals(api: Context, conn: Db) -> list[dict[str, Any]]:
    """Instances per current status."""
    return api.queries.status_totals(conn)


@router.get("/transitions")
def transitions(
    api: Context,
    conn: Db,
    service: str | None = None,
    instance: str | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Page:
    """Status changes, the latest stored first."""
    return api.queries.transitions(
        conn,
        service=service,
        instance=instance,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )


@router.get("/{service}/{instance}")
def service(api: Context, conn: Db, service: str, instance: str) -> dict[str, Any]:
    """One instance's status and last report's checks (as listed), and `earlier_checks`:
    those only earlier reports named, in the state they were last reported."""
    found = api.queries.service(conn, service, instance)
    if found is None:
        raise ApiError(404, "not_found", f"no reports from {service}/{instance}")
    return found
