"""Subscriber for metrics messages (`metrics.v<major>.<source>`)."""

from __future__ import annotations

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from .subscriber import BatchHandler, subscribe_batches

__all__ = ["register"]

DOMAIN = Domain.METRICS


def register(
    broker: NatsBroker, intake: BatchHandler, settings: Settings, subjects: Subjects
) -> None:
    """Register the metrics batch subscriber on the broker."""
    subscribe_batches(broker, intake, settings, subjects)
