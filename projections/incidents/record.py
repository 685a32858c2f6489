"""Incident events: the correlator's decisions and operators' actions as recorded, and the
incident each event history folds into.

Five events, past tense, each for one incident, each at a store position:

- `IncidentOpened` (rule, key, zone, capture time of the earliest cause, the causes'
  event ids), `EvidenceAdded` (an event id), `Assessed` (score, level, reasons): what
  the correlator decided because of the stored event at `position`. Their ids are
  uuid5 of the incident, the kind, the position and the decision's index among those
  that event caused, so deciding again from the same events gives the same ids.
- `Acknowledged`, `Resolved` (by whom, a note, when): what an operator did, placed
  *after* the stored event at `position` (see `tables.py`). One of each per incident:
  their ids are uuid5 of the incident and the kind, so a retried request is refused as
  already done rather than recorded twice.

`fold` turns an incident's events, in log order (`order`), into the read model's row;
the live process and a rebuild use it alike, so both give the same rows.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import Any, Literal

from .correlate import AddEvidence, Assess, Decision, OpenIncident

__all__ = [
    "ACTIONS",
    "DECIDED",
    "Incident",
    "IncidentEvent",
    "Kind",
    "action_id",
    "fold",
    "order",
    "recorded",
]

Kind = Literal["IncidentOpened", "EvidenceAdded", "Assessed", "Acknowledged", "Resolved"]
DECIDED: tuple[Kind, ...] = ("IncidentOpened", "EvidenceAdded", "Assessed")
"""Events the incident process decides (table `incident_events`)."""
ACTIONS: tuple[Kind, ...] = ("Acknowledged", "Resolved")
"""Events operators record (table `incident_actions`)."""

_NAMESPACE = uuid.UUID("0b7f3a9c-52d1-5e8a-8c3f-1d6e4a2b9f70")


@dataclass(frozen=True, slots=True)
class IncidentEvent:
    """One recorded incident event: its id, incident, kind, store position and data."""

    event_id: uuid.UUID
    incident_id: uuid.UUID
    kind: Kind
    position: int
    data: dict[str, Any]
    seq: int = 0
    """Order of recording within the event's table (0 until recorded)."""


def recorded(decision: Decision, index: int) -> IncidentEvent:
    """The event recording `decision`, the `index`-th decision its stored event caused."""
    kind: Kind
    data: dict[str, Any]
    if isinstance(decision, OpenIncident):
        kind = "IncidentOpened"
        data = {
            "rule": decision.rule,
            "key": decision.key,
            "zone": decision.zone,
            "at": decision.at.isoformat(),
            "causes": [str(c) for c in decision.causes],
        }
    elif isinstance(decision, AddEvidence):
        kind, data = "EvidenceAdded", {"event_id": str(decision.event_id)}
    else:
        assert isinstance(decision, Assess)
        a = decision.assessment
        kind = "Assessed"
        data = {"score": a.score, "level": a.level.value, "reasons": list(a.reasons)}
    ident = uuid.uuid5(_NAMESPACE, f"{decision.incident_id}|{kind}|{decision.position}|{index}")
    return IncidentEvent(ident, decision.incident_id, kind, decision.position, data)


def action_id(incident_id: uuid.UUID, kind: Kind) -> uuid.UUID:
    """The id of an operator's action on an incident: one of each kind per incident."""
    return uuid.uuid5(_NAMESPACE, f"{incident_id}|{kind}")


def order(event: IncidentEvent) -> tuple[int, int, int]:
    """Log order: by store position; at one position the decisions its event caused,
    then the actions placed after it; each table in the order it was recorded."""
    return event.position, int(event.kind in ACTIONS), event.seq


@dataclass(frozen=True, slots=True)
class Incident:
    """An incident as the read model holds it (table `incidents`)."""

    incident_id: uuid.UUID
    rule: str
    key: str
    zone: str | None
    opened_at: datetime
    opened_position: int
    updated_position: int
    causes: tuple[uuid.UUID, ...]
    evidence: tuple[uuid.UUID, ...] = ()
    """Every event of the incident, causes first, in the order they joined."""
    score: int = 0
    level: str = "low"
    reasons: tuple[str, ...] = ()
    acknowledged_by: str | None = None
    acknowledged_at: datetime | None = None
    acknowledged_note: str | None = None
    resolved_by: str | None = None
    resolved_at: datetime | None = None
    resolved_note: str | None = None
    state: str = field(default="open")
    """`open`, `acknowledged` or `resolved`."""

    def row(self) -> tuple[Any, ...]:
        """The values of the read model's columns (`COLUMNS`); tuples as lists (arrays)."""
        values = (getattr(self, c) for c in COLUMNS)
        return tuple(list(v) if isinstance(v, tuple) else v for v in values)

    @classmethod
    def from_row(cls, row: Sequence[Any]) -> Incident:
        """The incident of a read model's row (its `COLUMNS`)."""
        values = dict(zip(COLUMNS, row, strict=True))
        for name in ("causes", "evidence", "reasons"):
            values[name] = tuple(values[name])
        return cls(**values)


COLUMNS = tuple(Incident.__dataclass_fields__)
"""The read model's columns, in `Incident`'s order."""


def fold(incident: Incident | None, event: IncidentEvent) -> Incident | None:
    """The incident after `event` (None: an event of an incident whose opening is not
    recorded, which a consistent log never has)."""
    d = event.data
    if event.kind == "IncidentOpened":
        causes = tuple(uuid.UUID(c) for c in d["causes"])
        return Incident(
            incident_id=event.incident_id,
            rule=d["rule"],
            key=d["key"],
            zone=d["zone"],
            opened_at=datetime.fromisoformat(d["at"]),
            opened_position=event.position,
            updated_position=event.position,
            causes=causes,
            evidence=causes,
        )
    if incident is None:
        return None
    moved = max(incident.updated_position, event.position)
    if event.kind == "EvidenceAdded":
        added = uuid.UUID(d["event_id"])
        return replace(incident, evidence=(*incident.evidence, added), updated_position=moved)
    if event.kind == "Assessed":
        return replace(
            incident,
            score=d["score"],
            level=d["level"],
            reasons=tuple(d["reasons"]),
            updated_position=moved,
        )
    at = datetime.fromisoformat(d["at"])
    if event.kind == "Acknowledged" and incident.acknowledged_by is None:
        state = incident.state if incident.resolved_by else "acknowledged"
        return replace(
            incident,
            acknowledged_by=d["by"],
            acknowledged_at=at,
            acknowledged_note=d.get("note") or None,
            state=state,
        )
    if event.kind == "Resolved" and incident.resolved_by is None:
        return replace(
            incident,
            resolved_by=d["by"],
            resolved_at=at,
            resolved_note=d.get("note") or None,
            state="resolved",
        )
    return incident
