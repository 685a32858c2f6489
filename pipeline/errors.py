"""Errors of the pipeline. Each type says what happens to the message that caused it."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "DeadLetterUnavailable",
    "DetectionFailed",
    "DetectorUnavailable",
    "PipelineError",
    "Reason",
    "Rejected",
    "RetryLater",
    "StoreUnavailable",
    "Unavailable",
]


class PipelineError(Exception):
    """Root of every error the pipeline raises on purpose."""


class ConfigError(PipelineError):
    """Misconfiguration found at startup; the message names the setting to fix."""

    def __init__(self, setting: str, problem: str) -> None:
        super().__init__(f"{setting}: {problem}")
        self.setting = setting
        self.problem = problem


class Reason(StrEnum):
    """Why a message was dead-lettered."""

    INVALID_JSON = "invalid_json"
    SCHEMA_VIOLATION = "schema_violation"
    UNSUPPORTED_VERSION = "unsupported_version"
    OVERSIZED = "oversized"
    BAD_SUBJECT = "bad_subject"
    UNDECODABLE_IMAGE = "undecodable_image"
    DIMENSION_MISMATCH = "dimension_mismatch"
    UNSTORABLE = "unstorable"
    RETRIES_EXHAUSTED = "retries_exhausted"
    MAX_DELIVER_EXCEEDED = "max_deliver_exceeded"


class Rejected(PipelineError):
    """The message can never be accepted: dead-letter it now."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class RetryLater(PipelineError):
    """A failure that may be tied to the message: nak it with backoff.

    Each such failure uses up one of its deliveries; past `max_deliver` it is
    dead-lettered as `retries_exhausted`.
    """


class DetectionFailed(RetryLater):
    """The detector failed on these frames (an actor died or hung on their batch)."""


class Unavailable(PipelineError):
    """A server the pipeline needs is down: hold the messages, pause, probe until it is back.

    Never tied to a message: it uses up no delivery and never leads to a dead letter.
    """

    cause = "unavailable"
    """The `cause` label of `pipeline_intake_paused` while it lasts."""


class StoreUnavailable(Unavailable):
    """The event store could not be reached or did not commit (down, read-only, lock wait)."""

    cause = "store"


class DeadLetterUnavailable(Unavailable):
    """The dead-letter stream did not acknowledge the publish."""

    cause = "dead_letters"


class DetectorUnavailable(Unavailable):
    """No detector actor is running (the pool is starting, stopping or every actor is down)."""

    cause = "detector"
