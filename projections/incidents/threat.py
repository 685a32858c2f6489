"""Threat assessment: an incident's score and level from documented inputs, with reasons.

The score is the sum of:

| input | points |
|---|---|
| the rule's base severity | info 0, low 1, medium 3, high 5, critical 7 |
| the zone's criticality | low 0, medium +1, high +2, critical +3 (no zone: 0) |
| evidence captured outside the zone's opening hours | +1 |
| the most confident corroborating detection | ≥ 0.8: +2, ≥ 0.5: +1, below: +0 |
| earlier incidents in the same place (`ThreatInputs.repeats`) | +1 each, at most +2 |

and the level is `critical` from 8, `high` from 5, `medium` from 3, else `low`. Each
input present is listed as a reason with its points, in the order above (a zone of low
criticality as `+0`), such as `"outside hours +1"` or `"person 0.91 on cam-03 +2"`. The
same inputs always give the same assessment; `correlate.py` recomputes it as evidence
arrives.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from schemas import Severity

from .sites import Criticality

__all__ = ["Assessment", "Corroboration", "Level", "ThreatInputs", "assess"]

SEVERITY_POINTS: dict[Severity, int] = {
    Severity.INFO: 0,
    Severity.LOW: 1,
    Severity.MEDIUM: 3,
    Severity.HIGH: 5,
    Severity.CRITICAL: 7,
}
CRITICALITY_POINTS: dict[Criticality, int] = {
    Criticality.LOW: 0,
    Criticality.MEDIUM: 1,
    Criticality.HIGH: 2,
    Criticality.CRITICAL: 3,
}
OUTSIDE_HOURS_POINTS = 1
CONFIDENCE_POINTS = ((0.8, 2), (0.5, 1))
"""(minimum confidence, points), most first."""
REPEAT_POINTS = 1
REPEAT_MAX_POINTS = 2
REPEAT_WINDOW_S = 3600.0
LEVELS = ((8, "critical"), (5, "high"), (3, "medium"))


class Level(StrEnum):
    """How urgent an incident is, from its score."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


@dataclass(frozen=True, slots=True)
class Corroboration:
    """A detection that backs an incident: what, how sure, on which camera."""

    label: str
    confidence: float
    camera: str


@dataclass(frozen=True, slots=True)
class ThreatInputs:
    """Everything an assessment depends on."""

    severity: Severity
    zone: str | None = None
    criticality: Criticality | None = None
    outside_hours: bool = False
    detection: Corroboration | None = None
    repeats: int = 0
    """Incidents opened earlier in the same place (the zone; without one, the same source,
    camera or service) with first evidence in the hour before this one's."""


@dataclass(frozen=True, slots=True)
class Assessment:
    """An incident's threat: score, level and the reasons the score is made of."""

    score: int
    level: Level
    reasons: tuple[str, ...]


def assess(inputs: ThreatInputs) -> Assessment:
    """The threat of an incident with these inputs (see the module's table)."""
    parts: list[tuple[str, int]] = [
        (f"rule severity {inputs.severity.value}", SEVERITY_POINTS[inputs.severity])
    ]
    if inputs.criticality is not None:
        points = CRITICALITY_POINTS[inputs.criticality]
        parts.append((f"zone {inputs.zone} {inputs.criticality.value}", points))
    if inputs.outside_hours:
        parts.append(("outside hours", OUTSIDE_HOURS_POINTS))
    if inputs.detection is not None:
        d = inputs.detection
        points = next((p for least, p in CONFIDENCE_POINTS if d.confidence >= least), 0)
        parts.append((f"{d.label} {d.confidence:.2f} on {d.camera}", points))
    if inputs.repeats > 0:
        points = min(inputs.repeats * REPEAT_POINTS, REPEAT_MAX_POINTS)
        many = "incident" if inputs.repeats == 1 else "incidents"
        parts.append((f"{inputs.repeats} earlier {many} in the last hour", points))
    score = sum(points for _, points in parts)
    level = next((Level(name) for least, name in LEVELS if score >= least), Level.LOW)
    return Assessment(score, level, tuple(f"{text} +{points}" for text, points in parts))
