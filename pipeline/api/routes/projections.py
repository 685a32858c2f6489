"""`/v1/projections/...`: each view's position and lag, and skipping a poison event."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from projections import VIEWS
from projections.positions import SkipRefused
from projections.status import view_status

from ..auth import OPERATE, READ
from ..deps import Context, Db
from ..errors import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/projections", tags=["projections"])


@router.get("", dependencies=READ)
def projections(api: Context, conn: Db) -> list[dict[str, Any]]:
    """Each view's position, the head of the store, lag in events and seconds, state."""
    return [s.as_json() for s in view_status(conn, api.schema)]


@router.post("/{name}/skip", dependencies=OPERATE)
def skip(api: Context, conn: Db, name: str, position: int, note: str = "") -> dict[str, Any]:
    """Move a view stalled at `position` past that event (the skip is recorded)."""
    if name not in VIEWS:
        raise ApiError(404, "not_found", f"no view {name!r} (views: {', '.join(VIEWS)})")
    try:
        row = api.positions.skip(conn, name, position, note)
    except SkipRefused as exc:
        raise ApiError(409, "not_stalled_there", str(exc)) from None
    return {"view": name, "skipped": position, "position": row.position}
