"""Read models kept from the Journal's events: PostgreSQL tables in the store's schema.

Each view has its own position and is applied exactly once per event (view update and
position commit together); see `runner.py`. `VIEWS` lists them by name.
"""

from __future__ import annotations

from .cameras import CameraView
from .health import HealthView
from .rollups import RollupView
from .security import SecurityView
from .view import View

__all__ = ["VIEWS", "CameraView", "HealthView", "RollupView", "SecurityView", "View", "view"]

VIEWS: dict[str, type[View]] = {
    v.name: v for v in (SecurityView, HealthView, RollupView, CameraView)
}


def view(name: str) -> View:
    """The view called `name`; `KeyError` names the known ones."""
    try:
        return VIEWS[name]()
    except KeyError:
        raise KeyError(f"no view {name!r} (views: {', '.join(VIEWS)})") from None
