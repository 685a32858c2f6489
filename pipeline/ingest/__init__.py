"""Intake: pulled batches into stored events, dead letters, acks and naks."""

from __future__ import annotations

from .deadletter import DeadLetter, DeadLetters
from .dedup import CommittedIds
from .intake import Delivery, Intake, IntakeServices, delivery_info
from .writer import GroupWriter

__all__ = [
    "CommittedIds",
    "DeadLetter",
    "DeadLetters",
    "Delivery",
    "GroupWriter",
    "Intake",
    "IntakeServices",
    "delivery_info",
]
