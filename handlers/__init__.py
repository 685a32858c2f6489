"""FastStream subscribers: one generic batch subscriber for the JSON domains, one for frames."""

from __future__ import annotations

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from . import events, frames
from .subscriber import BatchHandler

__all__ = ["BatchHandler", "register"]


def register(
    broker: NatsBroker, intake: BatchHandler, settings: Settings, subjects: Subjects
) -> None:
    """Register the subscriber of the intake's domain on the broker."""
    if intake.domain is Domain.FRAMES:
        frames.register(broker, intake, settings, subjects)
    else:
        events.register(broker, intake, settings, subjects)
