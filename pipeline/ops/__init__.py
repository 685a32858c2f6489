"""Operating the pipeline: the CLI, the demo, the simulator, embedded servers, exports."""

from __future__ import annotations

__all__: list[str] = []
