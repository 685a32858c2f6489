"""`/v1/cameras/...`: each camera's activity and its detections per label and minute."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from projections.queries import Page

from ..auth import READ
from ..deps import Context, Cursor, Db, Limit, Since, Until

__all__ = ["router"]

router = APIRouter(prefix="/v1/cameras", tags=["cameras"], dependencies=READ)


@router.get("")
def cameras(api: Context, conn: Db) -> list[dict[str, Any]]:
    """Every camera: frames analysed and skipped, detections, mean inference, model."""
    return api.queries.cameras(conn)


@router.get("/detections")
def detections(
    api: Context,
    conn: Db,
    camera: str | None = None,
    label: str | None = None,
    since: Since = None,
    until: Until = None,
    limit: Limit = 1000,
    cursor: Cursor = None,
) -> Page:
    """Detections per camera, label and minute, the latest minute first."""
    return api.queries.detections(
        conn,
        camera=camera,
        label=label,
        since=since,
        until=until,
        limit=limit,
        cursor=cursor,
    )
