"""Services of the pipeline (settings, event store, intake, dead letters, metrics, ...)
and its composition root (`app`, `cli`), the only modules that import `handlers`."""

from __future__ import annotations

__all__: list[str] = []
