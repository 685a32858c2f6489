"""Correlation: observations in store order in, the incident decisions to record out.

`Correlator.feed` takes each observation (`observations.observe`) in store order and
returns what to record because of it: `OpenIncident`, `AddEvidence`, `Assess`. It
holds no clock and does no I/O: the same events in the same order give the same
decisions, with the same incident ids, which is what lets the incident process rebuild
from zero and record nothing new, and skip what it recorded before a crash. Operators'
resolutions are fed too (`resolve`), at their place in the store.

Time. Every window compares capture times (`at`: when the producer says it happened),
never store order. Events are stored roughly in capture order: a frame or a door event
may be stored after events captured later than it, by up to `correlation.lateness` (the
sites file). The correlator's clock, the watermark, is the newest capture time seen so
far; an event captured more than `lateness` before the watermark is *late*:

- an event on time is matched against every buffered event it could pair with, so a pair
  (or a count) whose members all arrive on time is found when its last member arrives,
  whatever order they came in; buffers keep what an on-time event could still match
  (capture times down to watermark - lateness - the rule's window);
- a late event cannot open a `correlate` or `count` incident (its partners may be gone)
  and is not buffered; it can still fire a `single` rule and join an incident that is
  gathering. `late_events` counts them.

Windows. `correlate`: the detection's capture time minus the security event's lies in
[-window.before, +window.after], bounds included, on a camera covering the security
source's zone. `count`: `count` events of one source (or zone) whose capture times fit
in `within` (first to last, included).

Joining. An incident gathers evidence while it is not resolved, for capture times from
`join_within` before its first evidence to `join_within` after its last, as long as its
evidence then spans at most `correlation.max_span`. A matching event in that span joins
it (`AddEvidence`) instead of opening another; for `correlate` rules an event of either
side joins, partner or not. Past `correlation.max_evidence` it is absorbed: it joins no
other incident and is not recorded (`absorbed_events`). An event outside every span may
open a new incident, so a storm of matching events is an incident per `max_span`. Once
the watermark is more than `lateness` past an incident's last evidence plus
`join_within`, no on-time event can join it and it is forgotten.

Identity. An incident's id is uuid5 of the rule, its key (the zone; the source, camera
or service where it has no zone; the source for `count` rules `per: source`) and the
event that opened it. Each opening, and each evidence that changes the assessment, is
followed by `Assess`; repeats (`threat.py`) count the incidents this correlator opened
in the same place with first evidence in the hour before.
"""

from __future__ import annotations

import bisect
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from .observations import DetectionSeen, Observation, SecuritySeen, ServiceSeen
from .rules import CorrelateRule, CountRule, Rule, SingleRule
from .sites import SiteMap
from .threat import REPEAT_WINDOW_S, Assessment, Corroboration, ThreatInputs, assess

__all__ = ["AddEvidence", "Assess", "Correlator", "Decision", "OpenIncident", "incident_id"]

_NAMESPACE = uuid.UUID("3c1e0a52-8b7d-5f44-9e2a-6d0b4f7c91e8")
_SWEEP = timedelta(seconds=60)


def incident_id(rule: str, key: str, opened_by: uuid.UUID) -> uuid.UUID:
    """An incident's identity: uuid5 of its rule, its key and the event that opened it."""
    return uuid.uuid5(_NAMESPACE, f"{rule}|{key}|{opened_by}")


@dataclass(frozen=True, slots=True)
class OpenIncident:
    """Record that an incident opened, caused by these events (in store order)."""

    incident_id: uuid.UUID
    position: int
    """Store position of the event whose arrival decided this."""
    rule: str
    key: str
    zone: str | None
    at: datetime
    """Capture time of the earliest cause."""
    causes: tuple[uuid.UUID, ...]


@dataclass(frozen=True, slots=True)
class AddEvidence:
    """Record that an event joined an open incident."""

    incident_id: uuid.UUID
    position: int
    event_id: uuid.UUID


@dataclass(frozen=True, slots=True)
class Assess:
    """Record an incident's (new) threat assessment."""

    incident_id: uuid.UUID
    position: int
    assessment: Assessment


Decision = OpenIncident | AddEvidence | Assess


@dataclass(frozen=True, slots=True)
class _Match:
    """How one observation matches one rule at one key."""

    key: str
    zone: str | None
    side: Literal["security", "detection", "service"]
    corroboration: Corroboration | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    at: datetime
    position: int
    event_id: uuid.UUID
    corroboration: Corroboration | None


@dataclass
class _Incident:
    id: uuid.UUID
    key: str
    zone: str | None
    rule: Rule
    first_at: datetime
    last_at: datetime
    join: timedelta
    span: timedelta
    repeats: int
    evidence: set[uuid.UUID] = field(default_factory=set)
    outside_hours: bool = False
    detection: Corroboration | None = None
    assessment: Assessment | None = None
    resolved: bool = False

    def gathers(self, at: datetime) -> bool:
        if self.resolved or not self.first_at - self.join <= at <= self.last_at + self.join:
            return False
        return max(self.last_at, at) - min(self.first_at, at) <= self.span


class Correlator:
    """Feeds on observations in store order; says which incidents to open, join, assess."""

    def __init__(self, sites: SiteMap) -> None:
        self.sites = sites
        settings = sites.file.correlation
        self.lateness = timedelta(seconds=settings.lateness)
        self._join = {
            name: timedelta(seconds=rule.join_within or settings.join_within)
            for name, rule in sites.rules.items()
        }
        self.watermark: datetime | None = None
        self._span = timedelta(seconds=settings.max_span)
        self._max_evidence = settings.max_evidence
        self.late_events = 0
        """Events that arrived too late to correlate (see the module's docstring)."""
        self.absorbed_events = 0
        """Matching events an incident took without recording them (`max_evidence`)."""
        # (rule, key, side) -> buffered events of windowed rules, by capture time
        self._buffers: dict[tuple[str, str, str], list[_Entry]] = {}
        # (rule, key) -> incidents, newest last
        self._incidents: dict[tuple[str, str], list[_Incident]] = {}
        self._by_id: dict[uuid.UUID, _Incident] = {}
        # place (zone, else key) -> first capture times of incidents opened there
        self._history: dict[str, list[datetime]] = {}
        self._swept: datetime | None = None

    def feed(self, o: Observation) -> list[Decision]:
        """The decisions to record because `o` (the next event in store order) arrived."""
        late = self.watermark is not None and o.at < self.watermark - self.lateness
        if late:
            self.late_events += 1
        elif self.watermark is None or o.at > self.watermark:
            self.watermark = o.at
        decisions: list[Decision] = []
        for name, rule in self.sites.rules.items():
            for match in self._matches(rule, o):
                decisions += self._apply(name, rule, match, o, late)
        self._sweep()
        return decisions

    def resolve(self, incident: uuid.UUID) -> None:
        """An operator resolved the incident: it gathers no more evidence."""
        found = self._by_id.pop(incident, None)
        if found is not None:
            found.resolved = True

    def open_incidents(self) -> list[uuid.UUID]:
        """Ids of the incidents still gathering evidence (for tests and the process's metrics)."""
        return [i.id for i in self._by_id.values() if not i.resolved]

    # Matching an observation to a rule

    def _matches(self, rule: Rule, o: Observation) -> list[_Match]:
        if isinstance(o, SecuritySeen):
            return self._security(rule, o)
        if isinstance(o, DetectionSeen):
            return self._detection(rule, o)
        return self._service(rule, o)

    def _allowed(self, rule: Rule, zone: str | None) -> bool:
        return not rule.zones or zone in rule.zones

    def _security(self, rule: Rule, o: SecuritySeen) -> list[_Match]:
        if rule.security is None or not rule.security.matches(o.kind, o.severity):
            return []
        zone = self.sites.zone_of_source(o.source, o.zone)
        if not self._allowed(rule, zone):
            return []
        if isinstance(rule, CorrelateRule):
            return [] if zone is None else [_Match(f"zone:{zone}", zone, "security")]
        if isinstance(rule, CountRule) and rule.per == "source":
            return [_Match(f"source:{o.source}", zone, "security")]
        key = f"zone:{zone}" if zone is not None else f"source:{o.source}"
        return [_Match(key, zone, "security")]

    def _detection(self, rule: Rule, o: DetectionSeen) -> list[_Match]:
        if isinstance(rule, CountRule) or rule.detection is None:
            return []
        best = rule.detection.best(o.detections)
        if best is None:
            return []
        seen = Corroboration(best[0], best[1], o.camera)
        zones = sorted(z for z in self.sites.zones_of_camera(o.camera) if self._allowed(rule, z))
        if not zones and isinstance(rule, SingleRule) and not rule.zones:
            return [_Match(f"camera:{o.camera}", None, "detection", seen)]
        return [_Match(f"zone:{z}", z, "detection", seen) for z in zones]

    def _service(self, rule: Rule, o: ServiceSeen) -> list[_Match]:
        if not isinstance(rule, SingleRule) or rule.service is None:
            return []
        if not rule.service.matches(o.service, o.status):
            return []
        zone = self.sites.zone_of_service(o.service)
        if not self._allowed(rule, zone):
            return []
        return [_Match(f"service:{o.service}", zone, "service")]

    # Deciding

    def _apply(
        self, name: str, rule: Rule, match: _Match, o: Observation, late: bool
    ) -> list[Decision]:
        entry = _Entry(o.at, o.position, o.event_id, match.corroboration)
        windowed = not isinstance(rule, SingleRule)
        if windowed and not late:
            buffer = self._buffers.setdefault((name, match.key, match.side), [])
            bisect.insort(buffer, entry, key=_order)
        for incident in reversed(self._incidents.get((name, match.key), [])):
            if incident.gathers(o.at):
                return self._join_incident(incident, entry, o.position)
        causes: list[_Entry]
        if isinstance(rule, SingleRule):
            causes = [entry]
        elif late:
            return []
        elif isinstance(rule, CorrelateRule):
            causes = self._pair(name, rule, match, entry)
        else:
            causes = self._count(name, rule, match, entry)
        if not causes:
            return []
        return self._open(name, rule, match, causes, o)

    def _pair(self, name: str, rule: CorrelateRule, match: _Match, entry: _Entry) -> list[_Entry]:
        before = timedelta(seconds=rule.window.before)
        after = timedelta(seconds=rule.window.after)
        if match.side == "security":  # detections from `before` before to `after` after
            partners = _between(
                self._buffer(name, match.key, "detection"), entry.at - before, entry.at + after
            )
        else:  # security events from `after` before to `before` after
            partners = _between(
                self._buffer(name, match.key, "security"), entry.at - after, entry.at + before
            )
        return [entry, *partners] if partners else []

    def _count(self, name: str, rule: CountRule, match: _Match, entry: _Entry) -> list[_Entry]:
        within = timedelta(seconds=rule.within)
        events = self._buffer(name, match.key, match.side)
        # Windows [start, start + within] that hold `entry`, earliest start first.
        first = bisect.bisect_left(events, entry.at - within, key=_at)
        end = first
        for start in range(first, len(events)):
            if events[start].at > entry.at:
                break
            end = max(end, bisect.bisect_right(events, events[start].at + within, key=_at))
            if end - start >= rule.count:
                return events[start:end]
        return []

    def _buffer(self, name: str, key: str, side: str) -> list[_Entry]:
        return self._buffers.get((name, key, side), [])

    def _open(
        self, name: str, rule: Rule, match: _Match, causes: list[_Entry], o: Observation
    ) -> list[Decision]:
        causes = sorted(causes, key=lambda e: e.position)
        first_at = min(e.at for e in causes)
        place = match.zone or match.key
        history = self._history.setdefault(place, [])
        since = first_at - timedelta(seconds=REPEAT_WINDOW_S)
        repeats = sum(1 for t in history if since <= t < first_at)
        history.append(first_at)
        incident = _Incident(
            id=incident_id(name, match.key, o.event_id),
            key=match.key,
            zone=match.zone,
            rule=rule,
            first_at=first_at,
            last_at=max(e.at for e in causes),
            join=self._join[name],
            span=self._span,
            repeats=repeats,
        )
        self._incidents.setdefault((name, match.key), []).append(incident)
        self._by_id[incident.id] = incident
        for cause in causes:
            self._take(incident, cause)
        opened = OpenIncident(
            incident.id,
            o.position,
            name,
            match.key,
            match.zone,
            first_at,
            tuple(e.event_id for e in causes),
        )
        return [opened, *self._reassess(incident, o.position)]

    def _join_incident(self, incident: _Incident, entry: _Entry, position: int) -> list[Decision]:
        if entry.event_id in incident.evidence:
            return []
        if len(incident.evidence) >= self._max_evidence:
            self.absorbed_events += 1
            return []
        self._take(incident, entry)
        added = AddEvidence(incident.id, position, entry.event_id)
        return [added, *self._reassess(incident, position)]

    def _take(self, incident: _Incident, entry: _Entry) -> None:
        incident.evidence.add(entry.event_id)
        incident.first_at = min(incident.first_at, entry.at)
        incident.last_at = max(incident.last_at, entry.at)
        zone = incident.zone
        if zone is not None and not self.sites.is_open(zone, entry.at):
            incident.outside_hours = True
        seen = entry.corroboration
        if seen is not None and (
            incident.detection is None or seen.confidence > incident.detection.confidence
        ):
            incident.detection = seen

    def _reassess(self, incident: _Incident, position: int) -> list[Decision]:
        zone = self.sites.zones.get(incident.zone) if incident.zone else None
        assessment = assess(
            ThreatInputs(
                severity=incident.rule.severity,
                zone=incident.zone,
                criticality=zone.criticality if zone is not None else None,
                outside_hours=incident.outside_hours,
                detection=incident.detection,
                repeats=incident.repeats,
            )
        )
        if assessment == incident.assessment:
            return []
        incident.assessment = assessment
        return [Assess(incident.id, position, assessment)]

    # Forgetting what no on-time event can match or join

    def _sweep(self) -> None:
        if self.watermark is None:
            return
        if self._swept is not None and self.watermark - self._swept < _SWEEP:
            return
        self._swept = self.watermark
        horizon = self.watermark - self.lateness
        for (name, key, side), entries in list(self._buffers.items()):
            rule = self.sites.rules[name]
            keep = horizon - _reach(rule)
            kept = entries[bisect.bisect_left(entries, keep, key=_at) :]
            if kept:
                self._buffers[(name, key, side)] = kept
            else:
                del self._buffers[(name, key, side)]
        for group, incidents in list(self._incidents.items()):
            kept_incidents = []
            for i in incidents:
                if not i.resolved and i.last_at + i.join >= horizon:
                    kept_incidents.append(i)
                else:
                    self._by_id.pop(i.id, None)
            if kept_incidents:
                self._incidents[group] = kept_incidents
            else:
                del self._incidents[group]
        oldest = horizon - timedelta(seconds=2 * REPEAT_WINDOW_S)
        for place, times in list(self._history.items()):
            recent = [t for t in times if t >= oldest]
            if recent:
                self._history[place] = recent
            else:
                del self._history[place]


def _at(entry: _Entry) -> datetime:
    return entry.at


def _order(entry: _Entry) -> tuple[datetime, int]:
    return entry.at, entry.position


def _between(entries: list[_Entry], lo: datetime, hi: datetime) -> list[_Entry]:
    """The entries (sorted by capture time) captured from `lo` to `hi`, both included."""
    return entries[
        bisect.bisect_left(entries, lo, key=_at) : bisect.bisect_right(entries, hi, key=_at)
    ]


def _reach(rule: Rule) -> timedelta:
    """How far apart in capture time two events a rule pairs or counts may be."""
    if isinstance(rule, CorrelateRule):
        return timedelta(seconds=max(rule.window.before, rule.window.after))
    if isinstance(rule, CountRule):
        return timedelta(seconds=rule.within)
    return timedelta(0)
