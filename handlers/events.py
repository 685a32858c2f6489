"""The subscriber of the JSON domains (security, monitoring, metrics): one per domain."""

from __future__ import annotations

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from streams import Subjects

from .subscriber import BatchHandler, subscribe_batches

__all__ = ["register"]


def register(
    broker: NatsBroker, intake: BatchHandler, settings: Settings, subjects: Subjects
) -> None:
    """Register the batch subscriber of the intake's domain (`<domain>.v<major>.<source>`)."""
    subscribe_batches(broker, intake, settings, subjects, batch_size=settings.batch_size)
