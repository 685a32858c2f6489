"""Threat assessment: the score, level and reasons of each documented case."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from projections.incidents import Corroboration, Criticality, Level, ThreatInputs, assess
from schemas import Severity

CAM3 = "cam-03"


def _person(confidence: float) -> Corroboration:
    return Corroboration("person", confidence, CAM3)


CASES = [
    # (inputs, score, level, reasons)
    (ThreatInputs(Severity.INFO), 0, Level.LOW, ("rule severity info +0",)),
    (ThreatInputs(Severity.LOW), 1, Level.LOW, ("rule severity low +1",)),
    (ThreatInputs(Severity.MEDIUM), 3, Level.MEDIUM, ("rule severity medium +3",)),
    (ThreatInputs(Severity.HIGH), 5, Level.HIGH, ("rule severity high +5",)),
    (ThreatInputs(Severity.CRITICAL), 7, Level.HIGH, ("rule severity critical +7",)),
    (
        ThreatInputs(Severity.MEDIUM, "hq/lobby", Criticality.LOW),
        3,
        Level.MEDIUM,
        ("rule severity medium +3", "zone hq/lobby low +0"),
    ),
    (
        ThreatInputs(Severity.LOW, "hq/lobby", Criticality.MEDIUM),
        2,
        Level.LOW,
        ("rule severity low +1", "zone hq/lobby medium +1"),
    ),
    (
        ThreatInputs(Severity.CRITICAL, "hq/vault", Criticality.HIGH),
        9,
        Level.CRITICAL,
        ("rule severity critical +7", "zone hq/vault high +2"),
    ),
    (
        ThreatInputs(Severity.HIGH, "hq/vault", Criticality.CRITICAL),
        8,
        Level.CRITICAL,
        ("rule severity high +5", "zone hq/vault critical +3"),
    ),
    (
        ThreatInputs(Severity.LOW, outside_hours=True),
        2,
        Level.LOW,
        ("rule severity low +1", "outside hours +1"),
    ),
    (
        ThreatInputs(Severity.LOW, "hq/lobby", Criticality.MEDIUM, outside_hours=True),
        3,
        Level.MEDIUM,
        ("rule severity low +1", "zone hq/lobby medium +1", "outside hours +1"),
    ),
    # Corroboration: below 0.5 counts nothing, from 0.5 one point, from 0.8 two.
    (
        ThreatInputs(Severity.HIGH, detection=_person(0.49)),
        5,
        Level.HIGH,
        ("rule severity high +5", "person 0.49 on cam-03 +0"),
    ),
    (
        ThreatInputs(Severity.MEDIUM, detection=_person(0.5)),
        4,
        Level.MEDIUM,
        ("rule severity medium +3", "person 0.50 on cam-03 +1"),
    ),
    (
        ThreatInputs(Severity.MEDIUM, detection=_person(0.79)),
        4,
        Level.MEDIUM,
        ("rule severity medium +3", "person 0.79 on cam-03 +1"),
    ),
    (
        ThreatInputs(Severity.MEDIUM, detection=_person(0.8)),
        5,
        Level.HIGH,
        ("rule severity medium +3", "person 0.80 on cam-03 +2"),
    ),
    # Repeats: one point each, at most two.
    (
        ThreatInputs(Severity.LOW, repeats=1),
        2,
        Level.LOW,
        ("rule severity low +1", "1 earlier incident in the last hour +1"),
    ),
    (
        ThreatInputs(Severity.LOW, repeats=2),
        3,
        Level.MEDIUM,
        ("rule severity low +1", "2 earlier incidents in the last hour +2"),
    ),
    (
        ThreatInputs(Severity.LOW, repeats=7),
        3,
        Level.MEDIUM,
        ("rule severity low +1", "7 earlier incidents in the last hour +2"),
    ),
    # The example: a forced door in the lobby outside hours, a person on cam-03.
    (
        ThreatInputs(
            Severity.HIGH,
            "hq/lobby",
            Criticality.MEDIUM,
            outside_hours=True,
            detection=_person(0.91),
        ),
        9,
        Level.CRITICAL,
        (
            "rule severity high +5",
            "zone hq/lobby medium +1",
            "outside hours +1",
            "person 0.91 on cam-03 +2",
        ),
    ),
    # Everything at once: the highest score there is.
    (
        ThreatInputs(
            Severity.CRITICAL,
            "hq/vault",
            Criticality.CRITICAL,
            outside_hours=True,
            detection=_person(1.0),
            repeats=3,
        ),
        15,
        Level.CRITICAL,
        (
            "rule severity critical +7",
            "zone hq/vault critical +3",
            "outside hours +1",
            "person 1.00 on cam-03 +2",
            "3 earlier incidents in the last hour +2",
        ),
    ),
]


@pytest.mark.parametrize(("inputs", "score", "level", "reasons"), CASES)
def test_threat_table(
    inputs: ThreatInputs, score: int, level: Level, reasons: tuple[str, ...]
) -> None:
    assessment = assess(inputs)
    assert (assessment.score, assessment.level, assessment.reasons) == (score, level, reasons)


inputs = st.builds(
    ThreatInputs,
    severity=st.sampled_from(Severity),
    zone=st.just("hq/lobby"),
    criticality=st.none() | st.sampled_from(Criticality),
    outside_hours=st.booleans(),
    detection=st.none() | st.builds(_person, st.floats(0, 1)),
    repeats=st.integers(0, 5),
)


@given(inputs)
def test_the_score_is_the_sum_of_its_reasons_and_the_level_follows_it(i: ThreatInputs) -> None:
    a = assess(i)
    assert a == assess(i)
    assert a.score == sum(int(r.rsplit("+", 1)[1]) for r in a.reasons)
    expected = (
        Level.CRITICAL
        if a.score >= 8
        else Level.HIGH
        if a.score >= 5
        else Level.MEDIUM
        if a.score >= 3
        else Level.LOW
    )
    assert a.level is expected


@given(inputs, st.floats(0, 1))
def test_more_evidence_never_lowers_the_threat(i: ThreatInputs, confidence: float) -> None:
    better = ThreatInputs(
        i.severity,
        i.zone,
        i.criticality,
        outside_hours=True,
        detection=_person(max(confidence, i.detection.confidence if i.detection else 0.0)),
        repeats=i.repeats,
    )
    assert assess(better).score >= assess(i).score
