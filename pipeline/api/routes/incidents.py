"""`/v1/incidents/...`: incidents (listed, one with its evidence and history), and an
operator's acknowledgement or resolution, recorded with who did it."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from projections.incidents import Level
from projections.incidents.queries import (
    IncidentNotFound,
    IncidentStateError,
    acknowledge,
    get_incident,
    page_incidents,
    resolve,
)

from ..auth import READ, Operator
from ..deps import Context, Cursor, Db, Limit, Since
from ..errors import ApiError, ErrorBody

__all__ = ["router"]

router = APIRouter(prefix="/v1/incidents", tags=["incidents"])

State = Literal["open", "acknowledged", "resolved"]

EVIDENCE_SHOWN = 100
"""Stored events shown with an incident (its evidence ids are all listed)."""


class Incident(BaseModel):
    """An incident as the read model holds it (ids as strings, times in ISO 8601)."""

    incident_id: str
    rule: str = Field(description="the sites file's rule that opened it")
    key: str = Field(description="what the rule correlated on (a zone, a door, a service)")
    zone: str | None
    opened_at: str = Field(description="capture time of its earliest cause")
    opened_position: int
    updated_position: int
    causes: list[str] = Field(description="event ids of the stored events that opened it")
    evidence: list[str] = Field(description="event ids of every event of it, causes first")
    score: int
    level: Level
    reasons: list[str] = Field(description='what the score adds up: "outside hours +1"')
    acknowledged_by: str | None
    acknowledged_at: str | None
    acknowledged_note: str | None
    resolved_by: str | None
    resolved_at: str | None
    resolved_note: str | None
    state: State


class IncidentPage(BaseModel):
    """One page of incidents and the cursor of the next one (None on the last page)."""

    items: list[Incident]
    next_cursor: str | None


class IncidentEvent(BaseModel):
    """One event of an incident's history: `IncidentOpened`, `EvidenceAdded`,
    `Assessed` (what the incident process decided) or `Acknowledged`, `Resolved` (what
    an operator did: `by`, `note`, `at`); the fields of its kind beside these."""

    model_config = ConfigDict(extra="allow")

    event_id: str
    incident_id: str
    kind: Literal["IncidentOpened", "EvidenceAdded", "Assessed", "Acknowledged", "Resolved"]
    position: int = Field(description="the store position it was decided at or placed after")


class IncidentDetail(Incident):
    """An incident with its history and the stored events that are its evidence."""

    history: list[IncidentEvent]
    evidence_events: list[dict[str, Any]] = Field(
        description="the stored events of `evidence` (security events, analysed frames with "
        f"their detections, health reports) as /v1/events answers them; the first "
        f"{EVIDENCE_SHOWN}"
    )


class Action(BaseModel):
    """What an operator says with an acknowledgement or resolution."""

    model_config = ConfigDict(extra="forbid")

    note: str = Field("", max_length=2000, description="recorded with the action")


class Recorded(BaseModel):
    """An operator's action as recorded: who (the caller), the note, when."""

    event_id: str
    incident_id: str
    kind: Literal["Acknowledged", "Resolved"]
    position: int
    by: str
    note: str
    at: str


_NOT_FOUND: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorBody, "description": "No incident has this id (yet)"}
}
_DONE: dict[int | str, dict[str, Any]] = {
    409: {"model": ErrorBody, "description": "Done already (or the incident is resolved)"}
}


@router.get("", dependencies=READ, response_model=IncidentPage)
def incidents(
    api: Context,
    conn: Db,
    state: State | None = None,
    level: Level | None = None,
    zone: str | None = None,
    since: Since = None,
    limit: Limit = 100,
    cursor: Cursor = None,
) -> Any:
    """Incidents: those not resolved first, then by score, the newest first; `since`
    filters by when they opened."""
    return page_incidents(
        conn,
        api.schema,
        state=state,
        level=level.value if level else None,
        zone=zone,
        since=since,
        limit=limit,
        cursor=cursor,
    )


@router.get(
    "/{incident_id}", dependencies=READ, response_model=IncidentDetail, responses=_NOT_FOUND
)
def incident(
    api: Context,
    conn: Db,
    incident_id: uuid.UUID,
    events: Annotated[bool, Query(description="include its evidence's stored events")] = True,
) -> Any:
    """One incident with its history (who acknowledged and resolved it) and evidence."""
    found = get_incident(conn, api.schema, incident_id)
    if found is None:
        raise ApiError(404, "not_found", f"no incident {incident_id}")
    shown = [uuid.UUID(e) for e in found["evidence"][:EVIDENCE_SHOWN]] if events else []
    stored = {str(p.event.originator_id): p.as_json() for p in api.reader.get_many(conn, shown)}
    found["evidence_events"] = [stored[str(e)] for e in shown if str(e) in stored]
    return found


def _act(
    kind: Literal["acknowledge", "resolve"],
    api: Context,
    conn: Db,
    incident_id: uuid.UUID,
    body: Action,
    caller: Operator,
) -> dict[str, Any]:
    record = acknowledge if kind == "acknowledge" else resolve
    try:
        return record(conn, api.schema, incident_id, caller.subject, body.note)
    except IncidentNotFound as exc:
        raise ApiError(404, "not_found", str(exc)) from None
    except IncidentStateError as exc:
        raise ApiError(409, "already_done", str(exc)) from None


@router.post(
    "/{incident_id}/acknowledge", response_model=Recorded, responses={**_NOT_FOUND, **_DONE}
)
def acknowledge_incident(
    api: Context, conn: Db, incident_id: uuid.UUID, caller: Operator, body: Action | None = None
) -> Any:
    """Record that the caller acknowledged the incident (once; `operate`)."""
    return _act("acknowledge", api, conn, incident_id, body or Action(), caller)


@router.post("/{incident_id}/resolve", response_model=Recorded, responses={**_NOT_FOUND, **_DONE})
def resolve_incident(
    api: Context, conn: Db, incident_id: uuid.UUID, caller: Operator, body: Action | None = None
) -> Any:
    """Record that the caller resolved the incident: it gathers no more evidence
    (once; `operate`)."""
    return _act("resolve", api, conn, incident_id, body or Action(), caller)
