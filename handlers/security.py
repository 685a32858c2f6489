"""Subscriber for security messages (`security.v<major>.<source>`)."""

from __future__ import annotations

from faststream.nats import NatsBroker

from pipeline.settings import Settings
from schemas import Domain
from streams import Subjects

from .subscriber import BatchHandler, subscribe_batches

__all__ = ["register"]

DOMAIN = Domain.SECURITY


def register(
    broker: NatsBroker, intake: BatchHandler, settings: Settings, subjects: Subjects
) -> None:
    """Register the security batch subscriber on the broker."""
    subscribe_batches(broker, intake, settings, subjects)
