"""Correlation rules: which stored events make an incident, as the sites file writes them.

Three types, chosen by the rule's `type`:

- `correlate`: a security event (`security`: kinds, minimum severity) and a detection
  (`detection`: labels, minimum confidence) on a camera that covers the security
  source's zone, the detection's capture time within `window.before` before to
  `window.after` after the security event's (bounds included);
- `single`: one event alone: a security event (`security`), a detection (`detection`)
  or a service report (`service`: a status such as `down`);
- `count`: `count` matching security events with the same source (`per: source`) or
  zone (`per: zone`) whose capture times fit in `within`.

Every rule has a base `severity` (the threat assessment's first input, see `threat.py`),
may be limited to some `zones` (`site/zone`), and keeps gathering evidence for
`join_within` after its last evidence (the file's `correlation.join_within` when unset).
Durations are seconds or strings such as `30s`, `2m`, `1h30m`.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    model_validator,
)

from schemas import HealthStatus, Severity

__all__ = [
    "SEVERITY_RANK",
    "CorrelateRule",
    "CountRule",
    "DetectionMatch",
    "Rule",
    "SecurityMatch",
    "ServiceMatch",
    "SingleRule",
    "Window",
    "parse_duration",
]

SEVERITY_RANK: dict[Severity, int] = {s: i for i, s in enumerate(Severity)}
"""Security severities in order: info < low < medium < high < critical."""

_DURATION = re.compile(r"^(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m)?(?:(\d+(?:\.\d+)?)s)?$")


def parse_duration(value: object) -> object:
    """Seconds from `30`, `2.5`, `"30s"`, `"2m"`, `"1h30m"`; anything else is left to fail."""
    if isinstance(value, str):
        match = _DURATION.match(value.strip())
        if not value.strip() or match is None:
            raise ValueError(f"{value!r} is not a duration (such as 30s, 2m, 1h30m)")
        hours, minutes, seconds = (float(g) if g else 0.0 for g in match.groups())
        return hours * 3600 + minutes * 60 + seconds
    return value


Seconds = Annotated[float, BeforeValidator(parse_duration), Field(ge=0, allow_inf_nan=False)]
"""A duration in seconds (0 or more)."""
Period = Annotated[float, BeforeValidator(parse_duration), Field(gt=0, allow_inf_nan=False)]
"""A duration in seconds (more than 0)."""

Kind = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_.-]*$", max_length=64)]
Label = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", max_length=64)]
ZoneId = Annotated[
    str,
    StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$"),
]
"""A zone as `site/zone`."""


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class SecurityMatch(_Model):
    """Which security events a rule takes: kinds (none: any kind) and a minimum severity."""

    kinds: tuple[Kind, ...] = ()
    min_severity: Severity = Severity.INFO

    def matches(self, kind: str, severity: Severity) -> bool:
        """Whether an event of `kind` and `severity` is taken."""
        if self.kinds and kind not in self.kinds:
            return False
        return SEVERITY_RANK[severity] >= SEVERITY_RANK[self.min_severity]


class DetectionMatch(_Model):
    """Which detections a rule takes: labels and a minimum confidence."""

    labels: Annotated[tuple[Label, ...], Field(min_length=1)]
    min_confidence: Annotated[float, Field(ge=0, le=1)] = 0.5

    def best(self, detections: Iterable[tuple[str, float]]) -> tuple[str, float] | None:
        """The most confident (label, confidence) taken, the first of equals; None if none."""
        found: tuple[str, float] | None = None
        for label, confidence in detections:
            taken = label in self.labels and confidence >= self.min_confidence
            if taken and (found is None or confidence > found[1]):
                found = (label, confidence)
        return found


class ServiceMatch(_Model):
    """Which health reports a rule takes: services (none: any) and statuses."""

    services: tuple[Name, ...] = ()
    statuses: Annotated[tuple[HealthStatus, ...], Field(min_length=1)] = (HealthStatus.DOWN,)

    def matches(self, service: str, status: HealthStatus) -> bool:
        """Whether a report of `service` with `status` is taken."""
        return (not self.services or service in self.services) and status in self.statuses


class Window(_Model):
    """How far a detection's capture time may be before or after the security event's."""

    before: Seconds = 30.0
    after: Seconds = 30.0


class _Rule(_Model):
    severity: Severity
    """The incident's base severity (see `threat.py`)."""
    zones: tuple[ZoneId, ...] = ()
    """Zones the rule applies in; none: everywhere."""
    join_within: Period | None = None
    """How long after its last evidence an incident still gathers evidence."""


class CorrelateRule(_Rule):
    """A security event and a detection on a camera covering its zone, within a window."""

    type: Literal["correlate"]
    security: SecurityMatch
    detection: DetectionMatch
    window: Window = Window()
    relation: Literal["camera_covers_zone"] = "camera_covers_zone"


class SingleRule(_Rule):
    """One event alone: a security event, a detection or a service report."""

    type: Literal["single"]
    security: SecurityMatch | None = None
    detection: DetectionMatch | None = None
    service: ServiceMatch | None = None

    @model_validator(mode="after")
    def _one_side(self) -> SingleRule:
        given = [s for s in (self.security, self.detection, self.service) if s is not None]
        if len(given) != 1:
            raise ValueError("a single rule names exactly one of security, detection, service")
        return self


class CountRule(_Rule):
    """`count` matching security events of one source (or zone) within `within`."""

    type: Literal["count"]
    security: SecurityMatch
    count: Annotated[int, Field(ge=2, le=10_000)]
    within: Period
    per: Literal["source", "zone"] = "source"


Rule = Annotated[CorrelateRule | SingleRule | CountRule, Field(discriminator="type")]
"""A rule of the sites file, by its `type`."""
