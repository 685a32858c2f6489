"""Sites: zones with a criticality and opening hours, and what cameras and sources are where.

The sites file (`PIPELINE_SITES_FILE`, YAML, read by `load.py`) holds the sites, the
correlation settings and the rules (`rules.py`). A zone is named `site/zone` everywhere
outside the file. A security source sits in one zone, a camera may cover several, a
service may run in one.

A security event's zone is its source's zone in this file; a source the file does not
place falls back to the zone the event names itself, when that is a zone of the file
(`site/zone`, or a zone name only one site uses).

Opening hours are per zone, in the zone's timezone (the site's when the zone names
none): a map of days (`mon`..`sun`, a range such as `mon-fri`, or `daily`) to time
ranges (`"07:00-19:00"`; an end before the start runs past midnight into the next day;
`24:00` ends a day). A zone without `hours` is always open; `hours: {}` is never open.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from .rules import Name, Period, Rule, Seconds

__all__ = [
    "Correlation",
    "Criticality",
    "Site",
    "SiteMap",
    "SitesFile",
    "Zone",
    "ZoneInfoView",
]

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Criticality(StrEnum):
    """How much a zone matters: raises the threat of its incidents (see `threat.py`)."""

    LOW = "low"
    MEDIUM = "medium"
    HIGH = "high"
    CRITICAL = "critical"


def _timezone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ValueError(f"unknown timezone {value!r} (an IANA name: Europe/Paris)") from None
    return value


Timezone = Annotated[str, AfterValidator(_timezone)]


def _days(value: str) -> str:
    _weekdays(value)
    return value


def _weekdays(spec: str) -> tuple[int, ...]:
    """Weekday numbers (Monday 0) of a day spec: `mon`, `mon-fri`, `fri-mon`, `daily`."""
    if spec == "daily":
        return tuple(range(7))
    first, _, last = spec.partition("-")
    if first not in DAYS or (last and last not in DAYS):
        raise ValueError(f"{spec!r}: days are mon..sun, a range such as mon-fri, or daily")
    start, end = DAYS.index(first), DAYS.index(last or first)
    return tuple((start + i) % 7 for i in range((end - start) % 7 + 1))


_RANGE = re.compile(r"^(\d{2}):(\d{2})-(\d{2}):(\d{2})$")


def _time_range(value: str) -> str:
    _minutes(value)
    return value


def _minutes(value: str) -> tuple[int, int]:
    """A range `HH:MM-HH:MM` as minutes of the day (start, end); end 1440 is `24:00`."""
    match = _RANGE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a time range such as 07:00-19:00")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if h1 > 23 or m1 > 59 or m2 > 59 or end > 1440 or start == end:
        raise ValueError(f"{value!r} is not a time range such as 07:00-19:00")
    return start, end


def _one_or_many(value: object) -> object:
    return [value] if isinstance(value, str) else value


DaySpec = Annotated[str, AfterValidator(_days)]
TimeRanges = Annotated[
    tuple[Annotated[str, AfterValidator(_time_range)], ...], BeforeValidator(_one_or_many)
]


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class Zone(_Model):
    """A zone: criticality, hours, and the cameras, security sources and services in it."""

    criticality: Criticality
    timezone: Timezone | None = None
    hours: dict[DaySpec, TimeRanges] | None = None
    cameras: tuple[Name, ...] = ()
    sources: tuple[Name, ...] = ()
    services: tuple[Name, ...] = ()


class Site(_Model):
    """A site: its zones and the timezone they keep hours in unless they name their own."""

    timezone: Timezone = "UTC"
    zones: Annotated[dict[Name, Zone], Field(min_length=1)]


class Correlation(_Model):
    """How correlation treats time (see `correlate.py`)."""

    lateness: Seconds = 120.0
    """How far behind the newest capture time seen an event may arrive and still correlate."""
    join_within: Period = 600.0
    """How long after its last evidence an incident gathers evidence (rules may override)."""
    max_span: Period = 3600.0
    """The most capture time an incident's evidence spans: a storm of matching events
    becomes an incident per `max_span`, not one that never ends."""
    max_evidence: Annotated[int, Field(ge=1, le=100_000)] = 100
    """The most evidence an incident records; matching events beyond it are absorbed."""


class SitesFile(_Model):
    """The whole sites file: sites, correlation settings and rules by name."""

    version: Literal[1] = 1
    correlation: Correlation = Correlation()
    sites: Annotated[dict[Name, Site], Field(min_length=1)]
    rules: dict[Name, Rule] = Field(default_factory=dict)

    def references(self) -> list[tuple[tuple[str | int, ...], str]]:
        """What the models alone cannot check: (path in the file, problem) for each
        source placed twice, service placed twice, or zone a rule names that no site has."""
        problems: list[tuple[tuple[str | int, ...], str]] = []
        placed: dict[str, dict[str, str]] = {"sources": {}, "services": {}}
        for site_name, site in self.sites.items():
            for zone_name, zone in site.zones.items():
                zone_id = f"{site_name}/{zone_name}"
                for field in ("sources", "services"):
                    for i, name in enumerate(getattr(zone, field)):
                        where = placed[field].setdefault(name, zone_id)
                        if where != zone_id or getattr(zone, field).index(name) != i:
                            path = ("sites", site_name, "zones", zone_name, field, i)
                            problems.append((path, f"{name} is already in zone {where}"))
        zones = {f"{s}/{z}" for s, site in self.sites.items() for z in site.zones}
        for rule_name, rule in self.rules.items():
            for i, zone_id in enumerate(rule.zones):
                if zone_id not in zones:
                    problems.append((("rules", rule_name, "zones", i), f"no zone {zone_id}"))
        return problems


class ZoneInfoView:
    """One zone as correlation and assessment see it: id, criticality, hours."""

    def __init__(self, zone_id: str, zone: Zone, timezone: str) -> None:
        self.id = zone_id
        self.criticality = zone.criticality
        self.tz = ZoneInfo(zone.timezone or timezone)
        self.always_open = zone.hours is None
        # Open minutes per weekday, as (start, end) ranges within that day.
        self._open: dict[int, list[tuple[int, int]]] = {d: [] for d in range(7)}
        for spec, ranges in (zone.hours or {}).items():
            for text in ranges:
                start, end = _minutes(text)
                for day in _weekdays(spec):
                    if end > start:
                        self._open[day].append((start, end))
                    else:  # past midnight: the rest of this day and the start of the next
                        self._open[day].append((start, 1440))
                        self._open[(day + 1) % 7].append((0, end))

    def is_open(self, at: datetime) -> bool:
        """Whether the zone is open at `at` (an aware time), by its local wall clock."""
        if self.always_open:
            return True
        local = at.astimezone(self.tz)
        minute = local.hour * 60 + local.minute
        return any(start <= minute < end for start, end in self._open[local.weekday()])


class SiteMap:
    """The sites file indexed: where each source, camera and service is."""

    def __init__(self, file: SitesFile) -> None:
        self.file = file
        self.zones: dict[str, ZoneInfoView] = {}
        self._source: dict[str, str] = {}
        self._service: dict[str, str] = {}
        cameras: dict[str, set[str]] = {}
        by_name: dict[str, list[str]] = {}
        for site_name, site in file.sites.items():
            for zone_name, zone in site.zones.items():
                zone_id = f"{site_name}/{zone_name}"
                self.zones[zone_id] = ZoneInfoView(zone_id, zone, site.timezone)
                by_name.setdefault(zone_name, []).append(zone_id)
                for source in zone.sources:
                    self._source.setdefault(source, zone_id)
                for service in zone.services:
                    self._service.setdefault(service, zone_id)
                for camera in zone.cameras:
                    cameras.setdefault(camera, set()).add(zone_id)
        self._cameras = {c: frozenset(z) for c, z in cameras.items()}
        self._by_name = {name: ids[0] for name, ids in by_name.items() if len(ids) == 1}

    @property
    def rules(self) -> Mapping[str, Rule]:
        """The rules by name, in the file's order."""
        return self.file.rules

    def zone_of_source(self, source: str, reported: str | None = None) -> str | None:
        """The zone of a security source; else the zone the event `reported`, if known."""
        if source in self._source:
            return self._source[source]
        if reported is None:
            return None
        if reported in self.zones:
            return reported
        return self._by_name.get(reported)

    def zones_of_camera(self, camera: str) -> frozenset[str]:
        """The zones a camera covers."""
        return self._cameras.get(camera, frozenset())

    def zone_of_service(self, service: str) -> str | None:
        """The zone a service runs in, if the file places it."""
        return self._service.get(service)

    def is_open(self, zone_id: str, at: datetime) -> bool:
        """Whether the zone is open at `at`."""
        return self.zones[zone_id].is_open(at)
