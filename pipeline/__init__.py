"""The pipeline's core, in rooms by capability.

Top level: `settings`, `errors`, `metrics`, `logs`, imported by every room and importing
none. Rooms: `store` (the event store), `ingest` (intake, group writer, dead letters,
dedup cache), `detection` (detector, Ray pool, frame intake), `ops` (CLI, demo,
simulator, embedded servers). `app` is the worker's composition root; it and `ops` are
the only modules that import `handlers`.
"""

from __future__ import annotations

__all__: list[str] = []
