"""`/v1/incidents/...`: incidents (listed, one with its evidence and history), and an
operator's acknowledgement or resolution, recorded with who did it."""

from __future__ import annotations

import uuid
from typing import Annotated, Any, Literal

import anyio
import nats
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from pydantic import BaseModel, ConfigDict, Field

from pipeline.store.domain import CameraFrame
from pipeline.store.reader import Positioned
from projections.incidents import Level
from projections.incidents.evidence import EXPIRED_REASON, FrameDamaged, NatsLink
from projections.incidents.frames import FrameState, FrameTable
from projections.incidents.queries import (
    IncidentNotFound,
    IncidentStateError,
    acknowledge,
    get_incident,
    page_incidents,
    resolve,
)
from schemas import FrameAnalyzedV1

from ..auth import READ, Operator
from ..deps import ApiContext, Context, Cursor, Db, Limit, Since
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


class FrameBox(BaseModel):
    """One detection on an evidence frame: its box in pixels of the frame (x1, y1, x2, y2)."""

    label: str
    confidence: float
    box: tuple[float, float, float, float]


class EvidenceFrame(BaseModel):
    """An analysed frame among an incident's evidence, and whether its image is kept."""

    event_id: str = Field(description="its `FrameAnalyzed` event")
    camera: str
    captured_at: str
    width: int
    height: int
    detections: list[FrameBox]
    state: Literal["kept", "expired", "pending"] = Field(
        description="`kept`: the evidence bucket holds the image (at `url`); `expired`: the "
        "FRAMES stream dropped it before it could be copied; `pending`: not copied yet"
    )
    url: str | None = Field(description="where the image is served (`read`), when kept")
    content_type: str | None
    size: int | None = Field(description="bytes of the image, when kept")
    detail: str = Field(description='why it is not kept: "frame expired before it was kept"')


class IncidentDetail(Incident):
    """An incident with its history and the stored events that are its evidence."""

    history: list[IncidentEvent]
    evidence_events: list[dict[str, Any]] = Field(
        description="the stored events of `evidence` (security events, analysed frames with "
        f"their detections, health reports) as /v1/events answers them; the first "
        f"{EVIDENCE_SHOWN}"
    )
    frames: list[EvidenceFrame] = Field(
        description="the analysed frames among those events, with their boxes, and whether "
        "each image is kept"
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
    shown = [uuid.UUID(e) for e in found["evidence"][:EVIDENCE_SHOWN]]
    stored = {p.event.originator_id: p for p in api.reader.get_many(conn, shown)}
    in_order = [stored[e] for e in shown if e in stored]
    found["evidence_events"] = [p.as_json() for p in in_order] if events else []
    frames = [p for p in in_order if isinstance(p.event, CameraFrame.FrameAnalyzed)]
    states = FrameTable(api.schema).states(conn, [p.event.originator_id for p in frames])
    found["frames"] = [_frame(incident_id, p, states.get(p.event.originator_id)) for p in frames]
    return found


def _frame(incident_id: uuid.UUID, item: Positioned, kept: FrameState | None) -> dict[str, Any]:
    payload = FrameAnalyzedV1.model_validate(item.event.payload)
    ident = item.event.originator_id
    state = kept.state if kept is not None else "pending"
    return {
        "event_id": str(ident),
        "camera": payload.frame.camera,
        "captured_at": payload.frame.captured_at.isoformat(),
        "width": payload.frame.width,
        "height": payload.frame.height,
        "detections": [
            {"label": d.label, "confidence": d.confidence, "box": d.box} for d in payload.detections
        ],
        "state": state,
        "url": f"{router.prefix}/{incident_id}/frames/{ident}" if state == "kept" else None,
        "content_type": kept.content_type if kept is not None else None,
        "size": kept.size if kept is not None else None,
        "detail": kept.reason if kept is not None else "not copied yet",
    }


_NO_FRAME: dict[int | str, dict[str, Any]] = {
    200: {
        "content": {"image/jpeg": {}, "image/png": {}},
        "description": "The frame's image as the camera sent it",
    },
    404: {
        "model": ErrorBody,
        "description": "No such incident or evidence frame, or its image is not kept "
        "(`frame_expired`, `frame_pending`, `frame_missing`)",
    },
    503: {"model": ErrorBody, "description": "The evidence bucket cannot be reached now"},
}


@router.get(
    "/{incident_id}/frames/{event_id}",
    dependencies=READ,
    response_class=Response,
    responses=_NO_FRAME,
)
async def incident_frame(
    request: Request, api: Context, incident_id: uuid.UUID, event_id: uuid.UUID
) -> Response:
    """The image of an analysed frame that is evidence of the incident, as kept in the
    evidence bucket (its `content_type`: what the camera sent)."""
    kept = await anyio.to_thread.run_sync(_kept_frame, api, incident_id, event_id)
    link = request.app.state.evidence
    assert isinstance(link, NatsLink)
    try:
        bucket = await link.bucket()
        stored = await bucket.read(str(event_id))
    except FrameDamaged as exc:
        raise ApiError(500, "frame_damaged", str(exc)) from None
    except (OSError, nats.errors.Error, TimeoutError) as exc:
        raise ApiError(
            503, "evidence_unavailable", f"the evidence bucket cannot be reached: {exc!r}"
        ) from None
    if stored is None:
        raise ApiError(404, "frame_missing", f"frame {event_id} is not in the evidence bucket")
    return Response(
        stored.data,
        media_type=kept.content_type or stored.content_type,
        # A kept frame never changes (its object is named by its event).
        headers={"Cache-Control": "private, max-age=86400", "X-Content-Type-Options": "nosniff"},
    )


def _kept_frame(api: ApiContext, incident_id: uuid.UUID, event_id: uuid.UUID) -> FrameState:
    with api.pool.connection() as conn:
        found = get_incident(conn, api.schema, incident_id)
        if found is None:
            raise ApiError(404, "not_found", f"no incident {incident_id}")
        if str(event_id) not in found["evidence"]:
            raise ApiError(
                404, "not_found", f"event {event_id} is not evidence of incident {incident_id}"
            )
        kept = FrameTable(api.schema).states(conn, [event_id]).get(event_id)
    if kept is None:
        raise ApiError(404, "frame_pending", f"frame {event_id} is not copied yet")
    if kept.state == "expired":
        raise ApiError(404, "frame_expired", f"frame {event_id}: {kept.reason or EXPIRED_REASON}")
    return kept


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
