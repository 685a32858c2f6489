"""The demo's traffic on the example sites file: its routine part opens no incident, each
scene opens one (of differing levels), and scenes come a few a minute at most."""

from __future__ import annotations

import json
import uuid
from collections import Counter
from datetime import UTC, datetime, timedelta

import pytest

from pipeline.ops.scenes import FIRST, SCENES, Scenes
from pipeline.ops.simulate import Outgoing, Traffic
from projections.incidents import (
    EXAMPLE_SITES,
    Assess,
    Correlator,
    Decision,
    Level,
    Observation,
    OpenIncident,
    SecuritySeen,
    ServiceSeen,
    load_sites,
)
from schemas import Domain, HealthStatus, Severity
from streams import Subjects

T0 = datetime(2026, 12, 1, 9, 30, tzinfo=UTC)  # a Tuesday, 10:30 in Paris: zones open
RULES = {
    "tamper": "critical-security-event",
    "badge-burst": "badge-rejected-burst",
    "held-open": "door-held-open-repeatedly",
    "service-down": "service-down",
}


def _observed(out: Outgoing, position: int, at: datetime) -> Observation | None:
    """What the incident process would observe of `out`, stored at `position`."""
    body = json.loads(out.body)
    ident = uuid.uuid5(uuid.NAMESPACE_URL, out.message_id)
    if out.domain is Domain.SECURITY:
        return SecuritySeen(
            position, ident, at, body["source"], body["kind"], Severity(body["severity"])
        )
    if out.domain is Domain.MONITORING:
        return ServiceSeen(
            position, ident, at, body["service"], body["instance"], HealthStatus(body["status"])
        )
    return None


def _feed(correlator: Correlator, timed: list[tuple[float, Outgoing]]) -> list[Decision]:
    """Feed messages at their times (seconds after T0), in time order."""
    decisions: list[Decision] = []
    for position, (offset, out) in enumerate(sorted(timed, key=lambda t: t[0]), start=1):
        seen = _observed(out, position, T0 + timedelta(seconds=offset))
        if seen is not None:
            decisions += correlator.feed(seen)
    return decisions


def _routine(seconds: float, rate: float, seed: int) -> list[tuple[float, Outgoing]]:
    traffic = Traffic(Subjects(), routine=True, duplicate_ratio=0.0, bad_ratio=0.0, seed=seed)
    return [(n / rate, traffic.next()) for n in range(int(seconds * rate))]


def test_routine_traffic_opens_no_incident() -> None:
    # A minute at the demo's default rate of 500 messages a second (what counts is that
    # no kind of message matches: a rule's threshold would be met within seconds).
    decisions = _feed(Correlator(load_sites(EXAMPLE_SITES)), _routine(60, 500, seed=1))
    assert not [d for d in decisions if isinstance(d, OpenIncident)]


def test_the_default_traffic_is_unchanged_by_the_routine_option() -> None:
    """Tests and benchmarks that seed `Traffic` get the messages they always got."""
    traffic = Traffic(Subjects(), seed=3)
    kinds = {json.loads(traffic.valid(Domain.SECURITY).body)["kind"] for _ in range(600)}
    assert {"alarm.tamper", "door.forced", "badge.rejected"} <= kinds


@pytest.mark.parametrize("name", sorted(RULES))
def test_each_scene_opens_one_incident_among_routine_traffic(name: str) -> None:
    scenes = Scenes(Subjects(), seed=5)
    scene = scenes.scene(name)
    timed = _routine(60, 50, seed=2) + [(30 + at, out) for at, out in scene.messages]
    opened = [d for d in _feed(Correlator(load_sites(EXAMPLE_SITES)), timed) if _opens(d)]
    assert [d.rule for d in opened if isinstance(d, OpenIncident)] == [RULES[name]]


def _opens(decision: Decision) -> bool:
    return isinstance(decision, OpenIncident)


def test_scenes_open_incidents_of_differing_levels() -> None:
    scenes = Scenes(Subjects(), seed=11)
    correlator = Correlator(load_sites(EXAMPLE_SITES))
    timed: list[tuple[float, Outgoing]] = []
    for n in range(40):  # ten minutes apart: none joins another
        timed += [(600 * n + at, out) for at, out in scenes.next().messages]
    decisions = _feed(correlator, timed)
    first: dict[uuid.UUID, Level] = {}
    for d in decisions:
        if isinstance(d, Assess):
            first.setdefault(d.incident_id, d.assessment.level)
    assert len(set(first.values())) >= 3, Counter(first.values())


def test_scenes_come_a_few_a_minute_at_most() -> None:
    scenes = Scenes(Subjects(), seed=7)
    starts = [scenes.first_s]
    while starts[-1] < 3600:
        starts.append(starts[-1] + scenes.pause())
    per_minute = Counter(int(at // 60) for at in starts[:-1])
    assert max(per_minute.values()) <= 3
    assert 50 <= len(starts) - 1 <= 180  # one every 20 to 60 s over the hour
    assert scenes.first_s <= 15  # the first one soon after the start


def test_the_first_scene_opens_an_incident_whatever_the_cameras_see() -> None:
    for seed in range(50):
        assert Scenes(Subjects(), seed=seed).next(first=True).name in FIRST
    assert set(FIRST) <= set(RULES) and set(SCENES) == {*RULES, "forced-door"}
