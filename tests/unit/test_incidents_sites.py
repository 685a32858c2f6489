"""The sites file: loaded and indexed, and every problem named by file, line and field."""

from __future__ import annotations

import textwrap
from datetime import UTC, datetime
from pathlib import Path

import pytest

from projections.incidents import EXAMPLE_SITES, SitesFileError, load_sites, parse_sites
from projections.incidents.rules import CorrelateRule, CountRule, SingleRule, parse_duration

VALID = """\
sites:
  hq:
    timezone: Europe/Paris
    zones:
      lobby:
        criticality: medium
        hours:
          mon-fri: "07:00-19:00"
          sat: ["09:00-12:00", "14:00-17:00"]
        cameras: [cam-01, cam-02]
        sources: [door-1]
      vault:
        criticality: critical
        timezone: America/New_York
        hours:
          fri-mon: "22:00-06:00"
        cameras: [cam-02]
        sources: [vault]
        services: [auth]
rules:
  forced-door:
    type: correlate
    severity: high
    security: {kinds: [door.forced], min_severity: high}
    detection: {labels: [person], min_confidence: 0.5}
    window: {before: 30s, after: 1m}
  burst:
    type: count
    severity: medium
    security: {kinds: [badge.rejected]}
    count: 5
    within: 2m
"""


def _error(text: str) -> list[str]:
    with pytest.raises(SitesFileError) as caught:
        parse_sites(text, "sites.yaml")
    return str(caught.value).splitlines()


def _replace(old: str, new: str) -> str:
    assert old in VALID
    return VALID.replace(old, new, 1)


def test_a_valid_file_is_indexed() -> None:
    sites = parse_sites(VALID, "sites.yaml")
    assert list(sites.zones) == ["hq/lobby", "hq/vault"]
    assert sites.zones_of_camera("cam-02") == {"hq/lobby", "hq/vault"}
    assert sites.zones_of_camera("cam-09") == frozenset()
    assert sites.zone_of_source("door-1") == "hq/lobby"
    assert sites.zone_of_service("auth") == "hq/vault"
    rule = sites.rules["forced-door"]
    assert isinstance(rule, CorrelateRule)
    assert (rule.window.before, rule.window.after) == (30.0, 60.0)
    assert isinstance(sites.rules["burst"], CountRule)
    assert sites.rules["burst"].within == 120.0


def test_the_example_file_loads_and_places_the_simulators_sources() -> None:
    sites = load_sites(EXAMPLE_SITES)
    for source in ("door-1", "door-7", "gate-north", "lobby-cam", "vault"):
        assert sites.zone_of_source(source) is not None
    for service in ("api-gateway", "billing", "auth", "search"):
        assert sites.zone_of_service(service) is not None
    assert sites.zones_of_camera("cam-01") and sites.zones_of_camera("cam-02")
    kinds = {type(rule) for rule in sites.rules.values()}
    assert kinds == {CorrelateRule, SingleRule, CountRule}


def test_a_source_the_file_does_not_place_falls_back_to_the_zone_it_reports() -> None:
    sites = parse_sites(VALID, "sites.yaml")
    assert sites.zone_of_source("door-9", "vault") == "hq/vault"
    assert sites.zone_of_source("door-9", "hq/lobby") == "hq/lobby"
    assert sites.zone_of_source("door-9", "zone-3") is None
    assert sites.zone_of_source("door-1", "vault") == "hq/lobby"  # the file wins


@pytest.mark.parametrize(
    ("zone", "at", "open_"),
    [
        # lobby, Europe/Paris (UTC+1 in winter, +2 in summer): mon-fri 07:00-19:00
        ("hq/lobby", datetime(2026, 11, 30, 6, 0, tzinfo=UTC), True),  # Mon 07:00 local
        ("hq/lobby", datetime(2026, 11, 30, 5, 59, tzinfo=UTC), False),  # Mon 06:59
        ("hq/lobby", datetime(2026, 11, 30, 18, 0, tzinfo=UTC), False),  # Mon 19:00: end excluded
        ("hq/lobby", datetime(2026, 7, 6, 16, 30, tzinfo=UTC), True),  # Mon 18:30 (summer)
        ("hq/lobby", datetime(2026, 11, 28, 12, 0, tzinfo=UTC), False),  # Sat 13:00, the gap
        ("hq/lobby", datetime(2026, 11, 28, 13, 0, tzinfo=UTC), True),  # Sat 14:00
        ("hq/lobby", datetime(2026, 11, 29, 10, 0, tzinfo=UTC), False),  # Sun
        # vault, America/New_York (UTC-5 in winter): fri-mon 22:00-06:00, past midnight
        ("hq/vault", datetime(2026, 11, 28, 3, 0, tzinfo=UTC), True),  # Fri 22:00
        ("hq/vault", datetime(2026, 12, 1, 10, 59, tzinfo=UTC), True),  # Tue 05:59 (Mon's)
        ("hq/vault", datetime(2026, 12, 1, 11, 0, tzinfo=UTC), False),  # Tue 06:00
        ("hq/vault", datetime(2026, 11, 27, 10, 0, tzinfo=UTC), False),  # Fri 05:00 (Thu's)
    ],
)
def test_opening_hours_follow_the_zones_timezone(zone: str, at: datetime, open_: bool) -> None:
    assert parse_sites(VALID, "sites.yaml").is_open(zone, at) is open_


def test_a_zone_without_hours_is_always_open_and_with_empty_hours_never() -> None:
    text = textwrap.dedent(
        """\
        sites:
          hq:
            zones:
              hall: {criticality: low}
              safe: {criticality: high, hours: {}}
        """
    )
    sites = parse_sites(text, "sites.yaml")
    noon = datetime(2026, 11, 30, 12, tzinfo=UTC)
    assert sites.is_open("hq/hall", noon)
    assert not sites.is_open("hq/safe", noon)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (
            _replace("criticality: medium", "criticality: huge"),
            "sites.yaml:6: sites.hq.zones.lobby.criticality: "
            "must be one of low, medium, high, critical",
        ),
        (
            _replace("        criticality: critical\n", ""),
            "sites.yaml:12: sites.hq.zones.vault.criticality: required",
        ),
        (
            _replace("        cameras: [cam-02]\n", "        camera: [cam-02]\n"),
            "sites.yaml:17: sites.hq.zones.vault.camera: unknown field",
        ),
        (
            _replace("America/New_York", "Mars/Olympus"),
            "sites.yaml:14: sites.hq.zones.vault.timezone: unknown timezone 'Mars/Olympus' "
            "(an IANA name: Europe/Paris)",
        ),
        (
            _replace("          sat:", "          sun-sat-mon:"),
            "sites.yaml:9: sites.hq.zones.lobby.hours.sun-sat-mon: 'sun-sat-mon': days are "
            "mon..sun, a range such as mon-fri, or daily",
        ),
        (
            _replace('"14:00-17:00"', '"14:00-25:00"'),
            "sites.yaml:9: sites.hq.zones.lobby.hours.sat[1]: '14:00-25:00' is not a time range "
            "such as 07:00-19:00",
        ),
        (
            _replace("cameras: [cam-01, cam-02]", "cameras: [cam-01, 'cam 02']"),
            "sites.yaml:10: sites.hq.zones.lobby.cameras[1]: a name of letters, digits, '.', '_' "
            "and '-', starting with a letter or digit",
        ),
        (
            _replace("    type: correlate\n", "    type: together\n"),
            "sites.yaml:22: rules.forced-door.type: must be one of correlate, single, count",
        ),
        (
            _replace("    type: count\n", ""),
            "sites.yaml:27: rules.burst.type: required (one of correlate, single, count)",
        ),
        (
            _replace("min_confidence: 0.5", "min_confidence: 1.5"),
            "sites.yaml:25: rules.forced-door.detection.min_confidence: must be at most 1.0",
        ),
        (
            _replace("before: 30s", "before: soon"),
            "sites.yaml:26: rules.forced-door.window.before: 'soon' is not a duration "
            "(such as 30s, 2m, 1h30m)",
        ),
        (
            _replace("    severity: medium\n", "    severity: urgent\n"),
            "sites.yaml:29: rules.burst.severity: must be one of info, low, medium, high, critical",
        ),
        (
            _replace("    count: 5\n", "    count: 1\n"),
            "sites.yaml:31: rules.burst.count: must be at least 2",
        ),
        (
            VALID + "  down:\n    type: single\n    severity: high\n",
            "sites.yaml:33: rules.down: a single rule names exactly one of security, "
            "detection, service",
        ),
        (
            VALID + "  down:\n    type: single\n    severity: high\n    zones: [vault]\n"
            "    service: {statuses: [down]}\n",
            "sites.yaml:36: rules.down.zones[0]: a zone as site/zone",
        ),
        (
            _replace("        sources: [vault]\n", "        sources: [vault, door-1]\n"),
            "sites.yaml:18: sites.hq.zones.vault.sources[1]: door-1 is already in zone hq/lobby",
        ),
        (
            VALID + "  down:\n    type: single\n    severity: high\n    zones: [hq/roof]\n"
            "    service: {statuses: [down]}\n",
            "sites.yaml:36: rules.down.zones[0]: no zone hq/roof",
        ),
        (
            _replace("      vault:\n", "      lobby:\n"),
            "sites.yaml:12: sites.hq.zones.lobby: duplicate key",
        ),
        (
            _replace("    zones:\n", "    zones:\n      - [\n"),
            "sites.yaml:7: not valid YAML: expected ',' or ']', but got ':'",
        ),
        ("", "sites.yaml:1: the file is empty"),
        ("- a\n- b\n", "sites.yaml:1: input should be a valid dictionary or instance of SitesFile"),
        ("version: 2\nsites: {}\n", "sites.yaml:1: version: must be one of 1"),
        ("version: 1\nsites: {}\n", "sites.yaml:2: sites: must not be empty"),
    ],
)
def test_a_problem_names_the_file_line_and_field(text: str, problem: str) -> None:
    assert problem in _error(text)


def test_every_problem_is_reported_at_once_in_file_order() -> None:
    text = _replace("criticality: medium", "criticality: huge").replace("count: 5", "count: 0")
    text = text.replace("America/New_York", "Nowhere")
    problems = _error(text)
    assert [p.split(":")[1] for p in problems] == ["6", "14", "31"]


def test_load_names_the_path_it_was_given(tmp_path: Path) -> None:
    path = tmp_path / "sites.yaml"
    path.write_text(_replace("criticality: medium", "criticality: 3"))
    with pytest.raises(SitesFileError) as caught:
        load_sites(path)
    assert str(caught.value).startswith(f"{path}:6: sites.hq.zones.lobby.criticality: must be")
    assert caught.value.setting == "PIPELINE_SITES_FILE"
    with pytest.raises(SitesFileError, match="cannot read"):
        load_sites(tmp_path / "missing.yaml")


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30.0), ("2m", 120.0), ("1h30m", 5400.0), ("1.5s", 1.5), (45, 45)],
)
def test_durations(text: str | int, seconds: float) -> None:
    assert parse_duration(text) == seconds
