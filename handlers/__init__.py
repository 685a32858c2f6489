"""FastStream subscribers, one module per domain."""

from __future__ import annotations

from collections.abc import Callable

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from . import frames, metrics, monitoring, security
from .subscriber import BatchHandler

__all__ = ["REGISTER", "BatchHandler"]

Register = Callable[[NatsBroker, BatchHandler, Settings, Subjects], None]

REGISTER: dict[Domain, Register] = {
    frames.DOMAIN: frames.register,
    security.DOMAIN: security.register,
    monitoring.DOMAIN: monitoring.register,
    metrics.DOMAIN: metrics.register,
}
"""How to register the subscriber of each domain."""
