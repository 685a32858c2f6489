"""`/v1/metrics/...`: the services' metrics, rolled up per minute, and totals of one metric."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from projections.queries import Page

from ..auth import READ
from ..deps import Context, Cursor, Db, Limit, Since, Until

__all__ = ["router"]

router = APIRouter(prefix="/v1/metrics", tags=["metrics"], dependencies=READ)


@router.get("/rollups")
def rollups(
    api: Context,
    conn: Db,
    service: str | None = None,
    instance: str | None = None,
    name: str | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page:
    """Per-minute count, sum, min, max and last of each metric, the latest minute first."""
    return api.queries.rollups(
        conn,
        service=service,
        instance=instance,
        name=name,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )


@router.get("/totals")
def metric_totals(
    api: Context,
    conn: Db,
    name: str,
    service: str | None = None,
    instance: str | None = None,
    since: Since = None,
    until: Until = None,
) -> list[dict[str, Any]]:
    """One metric over a time range, per service, instance and label set."""
    return api.queries.metric_totals(
        conn, name=name, service=service, instance=instance, since=since, until=until
    )
