"""Correlation: incidents open exactly when the rules say, once; evidence joins them.

Capture times are in milliseconds after T0. The property tests store events out of
capture order by up to the sites file's lateness (each is stored up to `LATENESS_MS`
after it was captured), around the window's edges, and check the decisions against an
oracle written from the rules' definitions.
"""

from __future__ import annotations

import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from eventsourcing.utils import get_topic
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.store.domain import CameraFrame, HealthReport, MetricsBatch, SecurityEvent
from pipeline.store.reader import Positioned
from projections.incidents import (
    EXAMPLE_SITES,
    AddEvidence,
    Assess,
    Correlator,
    Decision,
    DetectionSeen,
    Level,
    Observation,
    OpenIncident,
    SecuritySeen,
    ServiceSeen,
    SiteMap,
    incident_id,
    load_sites,
    observe,
    parse_sites,
)
from schemas import HealthStatus, Severity

T0 = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)  # a Monday
LATENESS_MS = 60_000
WINDOW_MS = 30_000

SITES = """\
correlation: {lateness: 60s, join_within: 10m}
sites:
  hq:
    zones:
      a: {criticality: medium, cameras: [cam-a, cam-ab], sources: [door-a]}
      b: {criticality: high, cameras: [cam-b, cam-ab], sources: [door-b]}
      srv: {criticality: high, services: [auth]}
rules:
"""
FORCED = """\
  forced:
    type: correlate
    severity: high
    security: {kinds: [door.forced], min_severity: high}
    detection: {labels: [person], min_confidence: 0.5}
    window: {before: 30s, after: 30s}
"""
BURST = """\
  burst:
    type: count
    severity: medium
    security: {kinds: [badge.rejected]}
    count: 3
    within: 60s
"""
SINGLES = """\
  alarm:
    type: single
    severity: critical
    security: {min_severity: critical}
  down:
    type: single
    severity: high
    service: {statuses: [down]}
"""


def _sites(*rules: str, correlation: str = "") -> SiteMap:
    text = SITES + "".join(rules)
    if correlation:
        text = text.replace("correlation: {lateness: 60s, join_within: 10m}", correlation)
    return parse_sites(text, "sites.yaml")


def _id(tag: str) -> uuid.UUID:
    return uuid.uuid5(uuid.NAMESPACE_URL, tag)


def _at(ms: int) -> datetime:
    return T0 + timedelta(milliseconds=ms)


def sec(
    pos: int,
    ms: int,
    source: str = "door-a",
    kind: str = "door.forced",
    severity: Severity = Severity.HIGH,
    tag: str = "",
) -> SecuritySeen:
    return SecuritySeen(pos, _id(tag or f"s{pos}"), _at(ms), source, kind, severity)


def det(
    pos: int,
    ms: int,
    camera: str = "cam-a",
    label: str = "person",
    confidence: float = 0.9,
    tag: str = "",
) -> DetectionSeen:
    return DetectionSeen(pos, _id(tag or f"d{pos}"), _at(ms), camera, ((label, confidence),))


def svc(pos: int, ms: int, status: HealthStatus, service: str = "auth") -> ServiceSeen:
    return ServiceSeen(pos, _id(f"h{pos}"), _at(ms), service, f"{service}-0", status)


def run(correlator: Correlator, observations: list[Observation]) -> list[Decision]:
    return [d for o in observations for d in correlator.feed(o)]


def opened(decisions: list[Decision]) -> list[OpenIncident]:
    return [d for d in decisions if isinstance(d, OpenIncident)]


def evidence(decisions: list[Decision], incident: uuid.UUID) -> list[uuid.UUID]:
    return [
        d.event_id for d in decisions if isinstance(d, AddEvidence) and d.incident_id == incident
    ]


# Correlate rules


def test_a_forced_door_and_a_person_within_the_window_open_one_incident() -> None:
    door, person = sec(1, 0), det(2, 12_000, camera="cam-ab")
    decisions = run(Correlator(_sites(FORCED)), [door, person])
    [incident] = opened(decisions)
    assert incident.rule == "forced"
    assert (incident.zone, incident.key, incident.position) == ("hq/a", "zone:hq/a", 2)
    assert incident.causes == (door.event_id, person.event_id)
    assert incident.at == door.at
    assert incident.incident_id == incident_id("forced", "zone:hq/a", person.event_id)
    [assessed] = [d for d in decisions if isinstance(d, Assess)]
    assert assessed.assessment.reasons == (
        "rule severity high +5",
        "zone hq/a medium +1",
        "person 0.90 on cam-ab +2",
    )
    assert assessed.assessment.level is Level.CRITICAL


def test_the_window_includes_its_edges_on_both_sides_in_either_arrival_order() -> None:
    for offset in (-WINDOW_MS, WINDOW_MS):
        assert opened(run(Correlator(_sites(FORCED)), [sec(1, 0), det(2, offset)]))
        assert opened(run(Correlator(_sites(FORCED)), [det(1, offset), sec(2, 0)]))
    for offset in (-WINDOW_MS - 1, WINDOW_MS + 1):
        assert not opened(run(Correlator(_sites(FORCED)), [sec(1, 0), det(2, offset)]))
        assert not opened(run(Correlator(_sites(FORCED)), [det(1, offset), sec(2, 0)]))


def test_a_buffered_event_is_kept_as_long_as_an_on_time_event_can_pair_with_it() -> None:
    # The detection at 0 s can pair with a door up to 30 s; a door at 30 s is on time
    # until the watermark passes 90 s (lateness 60 s).
    for clock, pairs in ((90_000, True), (90_001, False)):
        events = [det(1, 0), det(2, clock, camera="cam-b"), sec(3, 30_000)]
        assert bool(opened(run(Correlator(_sites(FORCED)), events))) is pairs


def test_an_uneven_window_bounds_before_and_after_apart() -> None:
    rule = FORCED.replace("{before: 30s, after: 30s}", "{before: 5s, after: 1m}")
    assert opened(run(Correlator(_sites(rule)), [sec(1, 0), det(2, 60_000)]))
    assert opened(run(Correlator(_sites(rule)), [det(1, 60_000), sec(2, 0)]))
    assert opened(run(Correlator(_sites(rule)), [det(1, -5_000), sec(2, 0)]))
    assert not opened(run(Correlator(_sites(rule)), [sec(1, 0), det(2, -5_001)]))
    assert not opened(run(Correlator(_sites(rule)), [det(1, 60_001), sec(2, 0)]))


def test_no_incident_without_a_camera_on_the_zone_a_label_or_the_confidence() -> None:
    for detection in (
        det(2, 1_000, camera="cam-b"),
        det(2, 1_000, camera="cam-x"),
        det(2, 1_000, label="car"),
        det(2, 1_000, confidence=0.49),
    ):
        assert not opened(run(Correlator(_sites(FORCED)), [sec(1, 0), detection]))
    for door in (sec(1, 0, severity=Severity.MEDIUM), sec(1, 0, kind="door.held_open")):
        assert not opened(run(Correlator(_sites(FORCED)), [door, det(2, 1_000)]))


def test_later_matching_events_join_the_open_incident() -> None:
    decisions = run(
        Correlator(_sites(FORCED)),
        [
            sec(1, 0),
            det(2, 5_000, confidence=0.6),
            det(3, 200_000, confidence=0.95),  # no door near it: joins as evidence
            sec(4, 400_000),
            det(5, 1_000, camera="cam-b"),  # another zone: not this incident's
        ],
    )
    [incident] = opened(decisions)
    assert evidence(decisions, incident.incident_id) == [_id("d3"), _id("s4")]
    scores = [d.assessment.score for d in decisions if isinstance(d, Assess)]
    assert scores == [7, 8]  # person 0.60 +1, then person 0.95 +2; the door changes nothing


def test_a_match_past_the_join_span_opens_a_new_incident_counting_the_first_as_a_repeat() -> None:
    later = 10 * 60_000 + 1
    decisions = run(
        Correlator(_sites(FORCED)),
        [sec(1, 0), det(2, 0), sec(3, later), det(4, later)],
    )
    first, second = opened(decisions)
    assert first.position == 2 and second.position == 4
    assessed = [
        d for d in decisions if isinstance(d, Assess) and d.incident_id == second.incident_id
    ]
    assert "1 earlier incident in the last hour +1" in assessed[-1].assessment.reasons


def test_a_resolved_incident_gathers_no_more_evidence() -> None:
    correlator = Correlator(_sites(FORCED))
    [incident] = opened(run(correlator, [sec(1, 0), det(2, 0)]))
    correlator.resolve(incident.incident_id)
    assert correlator.open_incidents() == []
    decisions = run(correlator, [sec(3, 1_000), det(4, 2_000)])
    [again] = opened(decisions)
    assert again.incident_id != incident.incident_id


def test_a_late_event_does_not_correlate_but_still_fires_a_single_rule() -> None:
    correlator = Correlator(_sites(FORCED, SINGLES))
    decisions = run(
        correlator,
        [
            det(1, 200_000),
            det(2, 100_000),  # 100 s behind: late (lateness 60 s)
            sec(3, 100_000),  # pairs with the late detection only
            sec(4, 139_999, source="door-b", kind="alarm.tamper", severity=Severity.CRITICAL),
        ],
    )
    assert correlator.late_events == 3
    [alarm] = opened(decisions)
    assert alarm.rule == "alarm" and alarm.zone == "hq/b"
    # On time at the bound's edge (the watermark is 200 s): these two pair.
    assert opened(run(correlator, [det(5, 140_000), sec(6, 140_000)]))
    assert correlator.late_events == 3


def test_an_event_at_the_bounds_edge_is_on_time_and_one_past_it_late() -> None:
    for ms, pairs in ((40_000, True), (39_999, False)):
        correlator = Correlator(_sites(FORCED))
        # The watermark is 100 s: a detection captured at 40 s is on time, at 39.999 s late.
        events = [det(1, 100_000, camera="cam-b"), det(2, ms), sec(3, 60_000)]
        assert bool(opened(run(correlator, events))) is pairs
        assert correlator.late_events == (0 if pairs else 1)


# Single and count rules


def test_a_critical_event_alone_opens_an_incident_and_the_next_ones_join() -> None:
    critical = Severity.CRITICAL
    decisions = run(
        Correlator(_sites(SINGLES)),
        [
            sec(1, 0, kind="alarm.tamper", severity=critical),
            sec(2, 1_000, kind="door.forced", severity=Severity.HIGH),
            sec(3, 2_000, kind="alarm.fire", severity=critical),
            sec(4, 3_000, source="door-x", kind="alarm.tamper", severity=critical),
        ],
    )
    first, unplaced = opened(decisions)
    assert (first.key, first.causes) == ("zone:hq/a", (_id("s1"),))
    assert evidence(decisions, first.incident_id) == [_id("s3")]
    assert (unplaced.key, unplaced.zone) == ("source:door-x", None)


def test_a_service_going_down_opens_an_incident_in_its_zone() -> None:
    decisions = run(
        Correlator(_sites(SINGLES)),
        [
            svc(1, 0, HealthStatus.OK),
            svc(2, 1_000, HealthStatus.DEGRADED),
            svc(3, 2_000, HealthStatus.DOWN),
            svc(4, 3_000, HealthStatus.DOWN),
            svc(5, 3_000, HealthStatus.DOWN, service="search"),
        ],
    )
    auth, search = opened(decisions)
    assert (auth.rule, auth.key, auth.zone, auth.causes) == (
        "down",
        "service:auth",
        "hq/srv",
        (_id("h3"),),
    )
    assert evidence(decisions, auth.incident_id) == [_id("h4")]
    assert (search.key, search.zone) == ("service:search", None)


def test_a_count_opens_on_the_nth_event_of_one_source_within_the_period() -> None:
    def rejected(pos: int, ms: int, source: str = "door-a") -> SecuritySeen:
        return sec(pos, ms, source, "badge.rejected", Severity.LOW)

    decisions = run(
        Correlator(_sites(BURST)),
        [
            rejected(1, 0),
            rejected(2, 30_000, source="door-b"),
            sec(3, 50_000, kind="badge.accepted", severity=Severity.INFO),
            rejected(4, 60_000),
            rejected(5, 40_000),  # stored after a later one, on time: 0, 40 s, 60 s
            rejected(6, 70_000),  # joins
        ],
    )
    [burst] = opened(decisions)
    assert (burst.key, burst.zone, burst.position) == ("source:door-a", "hq/a", 5)
    assert burst.causes == (_id("s1"), _id("s4"), _id("s5"))
    assert evidence(decisions, burst.incident_id) == [_id("s6")]
    too_far = [rejected(1, 0), rejected(2, 60_001), rejected(3, 40_000)]
    assert not opened(run(Correlator(_sites(BURST)), too_far))


def _rejected(pos: int, ms: int) -> SecuritySeen:
    return sec(pos, ms, "door-a", "badge.rejected", Severity.LOW)


def test_a_count_window_is_the_first_that_holds_enough() -> None:
    stored = ((1, 0), (2, 20_000), (3, 61_000), (4, 59_000))
    decisions = run(Correlator(_sites(BURST)), [_rejected(p, ms) for p, ms in stored])
    [burst] = opened(decisions)
    assert burst.position == 4
    assert burst.causes == (_id("s1"), _id("s2"), _id("s4"))


# Storms, caps, hours, identity


def test_a_storm_is_an_incident_per_max_span_and_evidence_is_capped() -> None:
    correlator = Correlator(
        _sites(SINGLES, correlation="correlation: {max_span: 5m, max_evidence: 10}")
    )
    critical = Severity.CRITICAL
    storm = [sec(p, p * 10_000, kind="alarm.tamper", severity=critical) for p in range(1, 64)]
    decisions = run(correlator, storm)
    incidents = opened(decisions)
    assert [i.position for i in incidents] == [1, 32, 63]  # evidence spans 5 min at most
    assert len(evidence(decisions, incidents[0].incident_id)) == 9
    assert correlator.absorbed_events == 2 * 21


def test_outside_hours_is_judged_in_the_zones_timezone() -> None:
    text = SITES.replace(
        "a: {criticality: medium,",
        'a: {criticality: medium, timezone: Asia/Tokyo, hours: {mon-fri: "09:00-18:00"},',
    )
    sites = parse_sites(text + FORCED, "sites.yaml")  # T0 is Monday 21:00 in Tokyo
    decisions = run(Correlator(sites), [sec(1, 0), det(2, 0)])
    [assessed] = [d for d in decisions if isinstance(d, Assess)]
    assert "outside hours +1" in assessed.assessment.reasons
    decisions = run(Correlator(sites), [sec(1, -12 * 3600_000), det(2, -12 * 3600_000)])
    [assessed] = [d for d in decisions if isinstance(d, Assess)]
    assert "outside hours +1" not in assessed.assessment.reasons


def test_a_rule_limited_to_zones_ignores_the_others() -> None:
    rule = FORCED + "    zones: [hq/b]\n"
    assert not opened(run(Correlator(_sites(rule)), [sec(1, 0), det(2, 0, camera="cam-ab")]))
    assert opened(run(Correlator(_sites(rule)), [sec(1, 0, "door-b"), det(2, 0, "cam-ab")]))


def test_the_readmes_worked_example_on_the_demo_sites() -> None:
    paris = ZoneInfo("Europe/Paris")

    def at(hh: int, mm: int, ss: int = 0) -> int:  # Tuesday 1 December 2026, Paris time
        local = datetime(2026, 12, 1, hh, mm, ss, tzinfo=paris)
        return int((local - T0) / timedelta(milliseconds=1))

    correlator = Correlator(load_sites(EXAMPLE_SITES))
    door = sec(1, at(23, 10), "door-1")
    assert correlator.feed(door) == []
    person = det(2, at(23, 10, 12), "cam-01", confidence=0.91)
    first, assessed = correlator.feed(person)
    assert isinstance(first, OpenIncident) and isinstance(assessed, Assess)
    assert (first.rule, first.zone) == ("forced-door-with-person", "hq/entrance")
    assert first.causes == (door.event_id, person.event_id)
    assert assessed.assessment.reasons == (
        "rule severity high +5",
        "zone hq/entrance medium +1",
        "outside hours +1",
        "person 0.91 on cam-01 +2",
    )
    assert (assessed.assessment.score, assessed.assessment.level) == (9, Level.CRITICAL)
    joined = run(correlator, [det(3, at(23, 11, 30), "cam-01"), sec(4, at(23, 12), "door-1")])
    assert evidence(joined, first.incident_id) == [_id("d3"), _id("s4")]
    assert not opened(joined)
    again = run(correlator, [sec(5, at(23, 20), "door-1"), det(6, at(23, 20, 5), "cam-01")])
    [second] = opened(again)
    [reassessed] = [d for d in again if isinstance(d, Assess)]
    assert reassessed.incident_id == second.incident_id
    assert reassessed.assessment.reasons[-1] == "1 earlier incident in the last hour +1"
    assert reassessed.assessment.score == 10


# From stored events


def _stored(cls: type, event: str, payload: dict[str, object], received: datetime) -> Positioned:
    event_class = getattr(cls, event)
    stored = event_class(
        originator_id=uuid.uuid4(),
        originator_version=1,
        timestamp=received,
        originator_topic=get_topic(cls),
        message_id="m-1",
        subject="x",
        stream_seq=1,
        schema_version="1.0",
        payload=payload,
        trace_id="",
    )
    return Positioned(7, stored)


def test_observe_reads_stored_events_and_never_takes_a_time_after_receipt() -> None:
    received = T0
    security = _stored(
        SecurityEvent,
        "Recorded",
        {
            "source": "door-a",
            "occurred_at": "2026-11-30T12:00:05+00:00",  # the producer's clock runs ahead
            "kind": "door.forced",
            "severity": "high",
            "zone": "a",
            "attributes": {},
        },
        received,
    )
    seen = observe(security)
    assert isinstance(seen, SecuritySeen)
    assert (seen.position, seen.at, seen.source, seen.zone) == (7, T0, "door-a", "a")
    assert seen.event_id == security.event.originator_id
    frame = {
        "frame": {
            "id": "f-1",
            "camera": "cam-a",
            "sequence": 3,
            "captured_at": "2026-11-30T11:59:58+00:00",
            "width": 640,
            "height": 480,
            "encoding": "jpeg",
        },
        "detections": [{"class_id": 0, "label": "person", "confidence": 0.7, "box": [1, 2, 3, 4]}],
        "inference_ms": 1.0,
        "batch_size": 1,
        "queue_ms": 0.0,
        "model": {
            "name": "m",
            "format": "onnx",
            "sha256": "0" * 64,
            "imgsz": 640,
            "conf": 0.25,
            "iou": 0.45,
            "classes": None,
            "half": False,
            "device": "cpu",
        },
    }
    seen_frame = observe(_stored(CameraFrame, "FrameAnalyzed", frame, received))
    assert isinstance(seen_frame, DetectionSeen)
    assert (seen_frame.camera, seen_frame.detections) == ("cam-a", (("person", 0.7),))
    assert seen_frame.at == T0 - timedelta(seconds=2)
    health = {
        "service": "auth",
        "instance": "auth-0",
        "reported_at": "2026-11-30T11:59:00+00:00",
        "status": "down",
        "checks": [],
    }
    seen_health = observe(_stored(HealthReport, "Recorded", health, received))
    assert isinstance(seen_health, ServiceSeen) and seen_health.status is HealthStatus.DOWN
    metrics = {"service": "w", "instance": "w-0", "collected_at": "2026-11-30T12:00:00Z"}
    assert observe(_stored(MetricsBatch, "Recorded", {**metrics, "samples": []}, received)) is None


# Properties: generated interleavings around the window's edges, out of order within the bound

ZONE_OF_SOURCE = {"door-a": "hq/a", "door-b": "hq/b"}
CAMERA_ZONES = {"cam-a": {"hq/a"}, "cam-b": {"hq/b"}, "cam-ab": {"hq/a", "hq/b"}}
EDGES = [-WINDOW_MS - 1, -WINDOW_MS, -WINDOW_MS + 1, -1, 0, 1, WINDOW_MS - 1, WINDOW_MS]
EDGES += [WINDOW_MS + 1]
CLOCK_EDGES = [WINDOW_MS + LATENESS_MS + d for d in (-1, 0, 1)]
CLOCK_EDGES += [-c for c in CLOCK_EDGES]


@dataclass(frozen=True)
class Ev:
    """A generated event: what it is, when it was captured, how long until it was stored."""

    index: int
    kind: str  # "security" or "detection"
    ms: int
    delay: int
    where: str  # a source or a camera
    matching: bool  # takes the rule's kind and severity, or its label and confidence

    def observation(self, position: int) -> Observation:
        tag = f"ev{self.index}"
        if self.kind == "security":
            kind, severity = (
                ("door.forced", Severity.HIGH) if self.matching else ("door.forced", Severity.LOW)
            )
            return sec(position, self.ms, self.where, kind, severity, tag=tag)
        confidence = 0.5 if self.matching else 0.49
        return det(position, self.ms, self.where, "person", confidence, tag=tag)


@st.composite
def interleavings(draw: st.DrawFn) -> list[Ev]:
    # Stored at once, at the bound's edge, or anywhere within it.
    delays = st.sampled_from([0, LATENESS_MS - 1, LATENESS_MS]) | st.integers(0, LATENESS_MS)
    matching = st.sampled_from([True, True, True, False])
    events: list[Ev] = []
    for i in range(draw(st.integers(1, 4))):
        source = draw(st.sampled_from(["door-a", "door-a", "door-b", "door-x"]))
        ms = draw(st.integers(0, 120_000))
        events.append(Ev(i, "security", ms, draw(delays), source, draw(matching)))
    anchors = list(events)
    for i in range(len(events), len(events) + draw(st.integers(0, 6))):
        anchor = draw(st.none() | st.sampled_from(anchors))
        if anchor is None:
            ms = draw(st.integers(-40_000, 160_000))
        else:  # at the window's edges, or where it moves the clock to a pair's last chance
            ms = anchor.ms + draw(st.sampled_from(EDGES) | st.sampled_from(CLOCK_EDGES))
        camera = draw(st.sampled_from(["cam-a", "cam-a", "cam-b", "cam-ab", "cam-x"]))
        events.append(Ev(i, "detection", ms, draw(delays), camera, draw(matching)))
    return events


def _in_zone(e: Ev, zone: str) -> bool:
    """Whether `e` takes a side of the rule in `zone`."""
    if not e.matching:
        return False
    if e.kind == "security":
        return ZONE_OF_SOURCE.get(e.where) == zone
    return zone in CAMERA_ZONES.get(e.where, set())


def _pairs(s: Ev, d: Ev, zone: str) -> bool:
    return _in_zone(s, zone) and _in_zone(d, zone) and -WINDOW_MS <= d.ms - s.ms <= WINDOW_MS


def _partners(a: Ev, b: Ev, zone: str) -> bool:
    """Whether a security event and a detection, in either order, pair in `zone`."""
    if (a.kind, b.kind) == ("detection", "security"):
        a, b = b, a
    return (a.kind, b.kind) == ("security", "detection") and _pairs(a, b, zone)


def _stored_order(events: list[Ev]) -> list[Ev]:
    return sorted(events, key=lambda e: (e.ms + e.delay, e.index))


@settings(max_examples=1000, deadline=None)
@given(interleavings())
def test_an_incident_opens_exactly_when_a_pair_is_complete_once_and_evidence_joins(
    events: list[Ev],
) -> None:
    order = _stored_order(events)
    correlator = Correlator(_sites(FORCED))
    decisions: list[Decision] = []
    for position, e in enumerate(order, 1):
        decisions += correlator.feed(e.observation(position))
    assert correlator.late_events == 0  # stored within the bound: nothing is late
    ids = {_id(f"ev{e.index}"): e for e in events}
    position_of = {e.index: p for p, e in enumerate(order, 1)}
    incidents = opened(decisions)
    assert len({i.incident_id for i in incidents}) == len(incidents)
    for zone in ("hq/a", "hq/b"):
        # The oracle: the first position at which a security event and a detection of the
        # zone, both stored by then, lie within the window.
        complete = [
            max(position_of[s.index], position_of[d.index])
            for s in events
            for d in events
            if s.kind == "security" and d.kind == "detection" and _pairs(s, d, zone)
        ]
        here = [i for i in incidents if i.zone == zone]
        if not complete:
            assert here == []
            continue
        [incident] = here
        assert incident.position == min(complete)
        trigger = order[incident.position - 1]
        causes = [ids[c] for c in incident.causes]
        assert trigger in causes
        earlier = order[: incident.position - 1]
        expected_partners = {e.index for e in earlier if _partners(trigger, e, zone)}
        assert {c.index for c in causes if c is not trigger} == expected_partners
        joined = evidence(decisions, incident.incident_id)
        assert len(joined) == len(set(joined))
        later = [e for e in order[incident.position :] if _in_zone(e, zone)]
        assert [ids[j] for j in joined] == later
    # Rebuilt from zero, the same events in the same order give the same decisions.
    again = Correlator(_sites(FORCED))
    rebuilt = [d for p, e in enumerate(order, 1) for d in again.feed(e.observation(p))]
    assert rebuilt == decisions


DELAYS = st.sampled_from([0, LATENESS_MS - 1, LATENESS_MS]) | st.integers(0, LATENESS_MS)


@settings(max_examples=1000, deadline=None)
@given(
    offset=st.sampled_from(EDGES) | st.integers(-2 * WINDOW_MS, 2 * WINDOW_MS),
    delays=st.tuples(DELAYS, DELAYS, DELAYS),
    clock=st.none() | st.sampled_from(CLOCK_EDGES) | st.integers(-150_000, 150_000),
)
def test_a_pair_opens_one_incident_iff_it_lies_within_the_window(
    offset: int, delays: tuple[int, int, int], clock: int | None
) -> None:
    door = Ev(0, "security", 0, delays[0], "door-a", True)
    person = Ev(1, "detection", offset, delays[1], "cam-a", True)
    events = [door, person]
    if clock is not None:  # an event elsewhere that moves the watermark
        events.append(Ev(2, "detection", max(0, offset) + clock, delays[2], "cam-b", False))
    order = _stored_order(events)
    correlator = Correlator(_sites(FORCED))
    decisions = [d for p, e in enumerate(order, 1) for d in correlator.feed(e.observation(p))]
    assert correlator.late_events == 0
    incidents = opened(decisions)
    if abs(offset) > WINDOW_MS:
        assert incidents == []
        return
    [incident] = incidents
    assert incident.position == max(order.index(door), order.index(person)) + 1
    assert set(incident.causes) == {_id("ev0"), _id("ev1")}


@st.composite
def rejections(draw: st.DrawFn) -> list[Ev]:
    events = []
    for i in range(draw(st.integers(0, 8))):
        source = draw(st.sampled_from(["door-a", "door-b"]))
        ms = draw(st.integers(0, 150_000))
        delay = draw(st.integers(0, LATENESS_MS))
        events.append(Ev(i, "security", ms, delay, source, draw(st.booleans())))
    # Events exactly one period apart: the edge of the count's window.
    if events and draw(st.booleans()):
        first = events[0]
        events.append(Ev(len(events), "security", first.ms + 60_000, 0, first.where, True))
    return events


def _rejection(e: Ev, position: int) -> SecuritySeen:
    kind = "badge.rejected" if e.matching else "badge.accepted"
    return sec(position, e.ms, e.where, kind, Severity.LOW, tag=f"ev{e.index}")


@settings(max_examples=400, deadline=None)
@given(rejections())
def test_a_count_opens_exactly_when_enough_events_fit_the_period_once(events: list[Ev]) -> None:
    order = _stored_order(events)
    correlator = Correlator(_sites(BURST))
    decisions = [d for p, e in enumerate(order, 1) for d in correlator.feed(_rejection(e, p))]
    incidents = opened(decisions)
    for source in ("door-a", "door-b"):
        # The oracle: the first position by which three of the source's rejections,
        # all stored by then, were captured within 60 s of each other.
        complete = None
        for p in range(1, len(order) + 1):
            times = sorted(e.ms for e in order[:p] if e.matching and e.where == source)
            if any(times[i + 2] - times[i] <= 60_000 for i in range(len(times) - 2)):
                complete = p
                break
        here = [i for i in incidents if i.key == f"source:{source}"]
        if complete is None:
            assert here == []
            continue
        [incident] = here
        assert incident.position == complete
        causes = [e for e in events if _id(f"ev{e.index}") in incident.causes]
        assert len(causes) >= 3 and order[complete - 1] in causes
        assert all(e.matching and e.where == source for e in causes)
        assert max(e.ms for e in causes) - min(e.ms for e in causes) <= 60_000
        later = [_id(f"ev{e.index}") for e in order[complete:] if e.matching and e.where == source]
        assert evidence(decisions, incident.incident_id) == later
    assert Counter(type(d) for d in decisions)[OpenIncident] == len(incidents)
