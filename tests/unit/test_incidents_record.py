"""Incident events: decisions recorded with ids derived from their cause, and folded into
the read model's row the same way whatever the batches."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from projections.incidents import AddEvidence, Assess, Assessment, Level, OpenIncident
from projections.incidents.record import IncidentEvent, action_id, fold, order, recorded

T0 = datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
INCIDENT = uuid.UUID(int=1)
CAUSES = (uuid.UUID(int=10), uuid.UUID(int=11))


def _history() -> list[IncidentEvent]:
    opened = OpenIncident(INCIDENT, 5, "forced", "zone:hq/a", "hq/a", T0, CAUSES)
    first = Assess(INCIDENT, 5, Assessment(7, Level.HIGH, ("rule severity high +5",)))
    joined = AddEvidence(INCIDENT, 9, uuid.UUID(int=12))
    second = Assess(INCIDENT, 9, Assessment(9, Level.CRITICAL, ("person 0.91 on cam +2",)))
    return [recorded(opened, 0), recorded(first, 1), recorded(joined, 0), recorded(second, 1)]


def _action(kind: str, position: int, by: str) -> IncidentEvent:
    data = {"by": by, "note": "", "at": T0.isoformat()}
    return IncidentEvent(action_id(INCIDENT, kind), INCIDENT, kind, position, data)  # type: ignore[arg-type]


def test_a_decision_made_again_from_the_same_event_has_the_same_id() -> None:
    assert [e.event_id for e in _history()] == [e.event_id for e in _history()]
    assert len({e.event_id for e in _history()}) == 4
    assert action_id(INCIDENT, "Resolved") != action_id(INCIDENT, "Acknowledged")


def test_the_history_folds_into_the_incident_and_actions_come_after_their_position() -> None:
    events = [*_history(), _action("Acknowledged", 5, "alice"), _action("Resolved", 9, "bob")]
    incident = None
    for event in sorted(events, key=order):
        incident = fold(incident, event)
    assert incident is not None
    assert incident.evidence == (*CAUSES, uuid.UUID(int=12))
    assert (incident.score, incident.level, incident.state) == (9, "critical", "resolved")
    assert (incident.acknowledged_by, incident.resolved_by) == ("alice", "bob")
    assert [e.kind for e in sorted(events, key=order)] == [
        "IncidentOpened",
        "Assessed",
        "Acknowledged",
        "EvidenceAdded",
        "Assessed",
        "Resolved",
    ]
    again = fold(incident, _action("Acknowledged", 12, "carol"))
    assert again == incident  # the first acknowledgement stands
    assert fold(None, _history()[2]) is None  # evidence of an incident never opened
