"""Read models built from the Journal's events (dashboards, incidents, audit log).

None exist yet: events are stored with topics such as
`pipeline.store.domain:SecurityEvent.Recorded`, ready for `eventsourcing.projection` views.
"""

from __future__ import annotations

__all__: list[str] = []
