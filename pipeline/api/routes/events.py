"""`/v1/events/{ident}`: one stored event, as the store holds it."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from ..auth import READ
from ..deps import Context, Db
from ..errors import ApiError

__all__ = ["router"]

router = APIRouter(prefix="/v1/events", tags=["events"], dependencies=READ)


@router.get("/{ident}")
def event(api: Context, conn: Db, ident: str) -> dict[str, Any]:
    """One stored event, by event id or by the producer's message id, with its position."""
    found = api.reader.find(conn, ident)
    if found is None:
        raise ApiError(404, "not_found", f"no stored event with id {ident!r}")
    return found.as_json()
