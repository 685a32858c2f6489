"""What the benchmarks share: another benchmark's parts, the store's roles, connections.

A benchmark is a script (`python bench/<name>.py`), not a package module: it puts the
repository on `sys.path` and imports this file as `bench.common`.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, Literal

import psycopg

from pipeline.settings import Settings

__all__ = ["as_role", "bench_module", "connect", "percentiles_ms"]

_HERE = Path(__file__).resolve().parent

Role = Literal["writer", "projector", "api", "auditor"]


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py as a module (loaded once): its parts are reused, not copied."""
    key = f"bench_{name}"
    if key in sys.modules:
        return sys.modules[key]
    spec = importlib.util.spec_from_file_location(key, _HERE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[key] = module  # dataclasses look their module up while it loads
    spec.loader.exec_module(module)
    return module


def as_role(settings: Settings, kind: Role) -> Settings:
    """`settings` connecting as one of the store's roles, as that part is deployed."""
    return settings.model_copy(update={"postgres_user": settings.postgres_role(kind)})


def connect(settings: Settings) -> psycopg.Connection[Any]:
    """A connection to the settings' database, in autocommit mode."""
    return psycopg.connect(**settings.postgres_connection(), autocommit=True)


def percentiles_ms(times: Sequence[float]) -> tuple[float, float]:
    """p50 and p99, in milliseconds, of durations in seconds."""
    ordered = sorted(times)
    return 1000 * statistics.median(ordered), 1000 * ordered[max(0, int(len(ordered) * 0.99) - 1)]
