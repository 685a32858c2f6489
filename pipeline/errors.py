"""Errors of the pipeline. Each type says what happens to the message that caused it."""

from __future__ import annotations

from enum import StrEnum

__all__ = [
    "ConfigError",
    "DeadLetterUnavailable",
    "DetectorUnavailable",
    "PipelineError",
    "Reason",
    "Rejected",
    "RetryLater",
    "StoreUnavailable",
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
    RETRIES_EXHAUSTED = "retries_exhausted"
    MAX_DELIVER_EXCEEDED = "max_deliver_exceeded"


class Rejected(PipelineError):
    """The message can never be accepted: dead-letter it now."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


class RetryLater(PipelineError):
    """A transient failure: nak the message for redelivery with backoff."""


class StoreUnavailable(RetryLater):
    """The event store could not be reached or did not commit."""


class DetectorUnavailable(RetryLater):
    """A detector actor failed or died during a call; its frames are retried."""


class DeadLetterUnavailable(RetryLater):
    """The dead-letter stream did not acknowledge the publish."""
