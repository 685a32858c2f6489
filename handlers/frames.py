"""The subscriber of camera frames (`frames.v<major>.<camera>`): image body, metadata headers."""

from __future__ import annotations

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from streams import Subjects

from .subscriber import BatchHandler, subscribe_batches

__all__ = ["register"]


def register(
    broker: NatsBroker, intake: BatchHandler, settings: Settings, subjects: Subjects
) -> None:
    """Register the frames batch subscriber; its intake runs the detector pool."""
    subscribe_batches(broker, intake, settings, subjects, batch_size=settings.frames_batch_size)
