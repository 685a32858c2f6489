"""Incidents: security events, detections and service health correlated by the sites file.

The deterministic core of the incident process: `load_sites` reads and validates the
sites file (`sites.py`, `rules.py`, `load.py`); `observe` turns stored events into
observations (`observations.py`); a `Correlator` fed them in store order returns the
decisions to record (`correlate.py`), each incident assessed by `assess` (`threat.py`).

The incident process around it (imported from their modules, not here): `process.py`
follows the store and records the decisions exactly once, `record.py` names the
incident events and folds them into the read model, `tables.py` keeps them,
`queries.py` serves the API (list, read, acknowledge, resolve), `service.py` runs it.
"""

from __future__ import annotations

from .correlate import AddEvidence, Assess, Correlator, Decision, OpenIncident, incident_id
from .load import EXAMPLE_SITES, Problem, SitesFileError, load_sites, parse_sites
from .observations import DetectionSeen, Observation, SecuritySeen, ServiceSeen, observe
from .rules import CorrelateRule, CountRule, Rule, SingleRule
from .sites import Criticality, SiteMap, SitesFile
from .threat import Assessment, Corroboration, Level, ThreatInputs, assess

__all__ = [
    "EXAMPLE_SITES",
    "AddEvidence",
    "Assess",
    "Assessment",
    "CorrelateRule",
    "Correlator",
    "Corroboration",
    "CountRule",
    "Criticality",
    "Decision",
    "DetectionSeen",
    "Level",
    "Observation",
    "OpenIncident",
    "Problem",
    "Rule",
    "SecuritySeen",
    "ServiceSeen",
    "SingleRule",
    "SiteMap",
    "SitesFile",
    "SitesFileError",
    "ThreatInputs",
    "assess",
    "incident_id",
    "load_sites",
    "observe",
    "parse_sites",
]
