"""The streams and durable consumers of the pipeline, as JetStream configs."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    DiscardPolicy,
    RetentionPolicy,
    StorageType,
    StreamConfig,
)

from schemas import Domain

from .subjects import Subjects

__all__ = [
    "AUDIT_RETENTION",
    "DEAD_LETTER_RETENTION",
    "EVIDENCE_RETENTION",
    "LETTER_HEADER_BYTES",
    "RETENTION",
    "ConsumerLimits",
    "Retention",
    "consumer_config",
    "evidence_bucket_config",
    "stream_configs",
]

HOUR = 3600.0
DAY = 24 * HOUR
GIB = 1024**3


@dataclass(frozen=True)
class Retention:
    """How long and how much a stream keeps, and what it refuses."""

    max_age_s: float
    max_bytes: int = -1
    duplicate_window_s: float = 120.0
    deny_delete: bool = False
    deny_purge: bool = False
    one_per_subject: bool = False
    """Keep the first message of each subject and refuse any later one (the DLQ)."""
    max_msg_bytes: int = -1
    """The largest message the stream takes (-1: the server's `max_payload`)."""


RETENTION: Mapping[Domain, Retention] = {
    Domain.FRAMES: Retention(max_age_s=HOUR, max_bytes=2 * GIB),
    Domain.SECURITY: Retention(
        max_age_s=90 * DAY, duplicate_window_s=600.0, deny_delete=True, deny_purge=True
    ),
    Domain.MONITORING: Retention(max_age_s=7 * DAY),
    Domain.METRICS: Retention(max_age_s=DAY),
}
DEAD_LETTER_RETENTION = Retention(
    # A letter outlives its source: a replay or late redelivery of a message still in its
    # stream finds its letter there and does not write a second one.
    max_age_s=max(policy.max_age_s for policy in RETENTION.values()),
    max_bytes=GIB,
    one_per_subject=True,
)
"""Full, the DLQ refuses new letters (discard new): the worker pauses, nothing is dropped."""
AUDIT_RETENTION = Retention(
    max_age_s=0.0,  # for ever: a copy of every signed checkpoint outside the database
    deny_delete=True,
    deny_purge=True,
    max_msg_bytes=256 * 1024,
)
"""The audit log's checkpoints: kept for ever; no message may be deleted, nor the stream
purged (by anyone: the server refuses it)."""
EVIDENCE_RETENTION = Retention(max_age_s=0.0, max_bytes=10 * GIB)
"""The incidents' evidence frames: kept for ever (as long as the incidents are); full, the
bucket refuses new frames (discard new) rather than dropping evidence already kept."""
LETTER_HEADER_BYTES = 64 * 1024
"""Room for a dead letter's headers beside its body, in the DLQ's largest message."""


@dataclass(frozen=True)
class ConsumerLimits:
    """Delivery limits of the durable consumers.

    Redelivery is unlimited at the server: the pipeline itself counts deliveries and
    dead-letters a message past `max_deliver`, because JetStream would only emit an
    advisory and leave the message stranded in the stream.
    """

    ack_wait_s: float = 30.0
    max_ack_pending: int = 4096


def stream_configs(
    subjects: Subjects,
    *,
    replicas: int = 1,
    storage: StorageType = StorageType.FILE,
    frames_max_bytes: int | None = None,
    dead_letters_max_bytes: int | None = None,
    dead_letter_max_body_bytes: int | None = None,
) -> list[StreamConfig]:
    """Configs of every domain stream, the dead-letter stream and the audit stream.

    JetStream reserves a stream's `max_bytes` on disk up front, so the frames and
    dead-letter caps are settings: size them to the disk the server has. A letter's
    body limit bounds each DLQ message (`max_msg_size`), headers included.
    """
    retention = dict(RETENTION)
    if frames_max_bytes is not None:
        retention[Domain.FRAMES] = replace(retention[Domain.FRAMES], max_bytes=frames_max_bytes)
    dead_letters = DEAD_LETTER_RETENTION
    if dead_letters_max_bytes is not None:
        dead_letters = replace(dead_letters, max_bytes=dead_letters_max_bytes)
    if dead_letter_max_body_bytes is not None:
        dead_letters = replace(
            dead_letters, max_msg_bytes=dead_letter_max_body_bytes + LETTER_HEADER_BYTES
        )
    configs = [
        _stream(subjects.stream(domain), subjects.wildcard(domain), policy, replicas, storage)
        for domain, policy in retention.items()
    ]
    configs.append(
        _stream(
            subjects.dead_letter_stream(),
            subjects.dead_letter_wildcard(),
            dead_letters,
            replicas,
            storage,
        )
    )
    configs.append(
        _stream(
            subjects.audit_stream(),
            subjects.audit_checkpoints(),
            AUDIT_RETENTION,
            replicas,
            storage,
        )
    )
    return configs


def evidence_bucket_config(
    subjects: Subjects,
    *,
    replicas: int = 1,
    storage: StorageType = StorageType.FILE,
    max_bytes: int | None = None,
    max_age_s: float | None = None,
) -> StreamConfig:
    """The stream of the evidence object store bucket, as nats.py's
    `create_object_store` makes it (so `js.object_store(bucket)` opens it): chunks and
    metadata subjects, roll-ups (an object's metadata replaces its last), direct gets,
    discard new. Applied with the other streams (`pipeline streams apply`)."""
    policy = replace(
        EVIDENCE_RETENTION,
        max_bytes=EVIDENCE_RETENTION.max_bytes if max_bytes is None else max_bytes,
        max_age_s=EVIDENCE_RETENTION.max_age_s if max_age_s is None else max_age_s,
    )
    bucket = subjects.evidence_bucket()
    return StreamConfig(
        name=f"OBJ_{bucket}",
        description="frames that are evidence of an incident, kept past the FRAMES stream",
        subjects=[f"$O.{bucket}.C.>", f"$O.{bucket}.M.>"],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        num_replicas=replicas,
        max_age=policy.max_age_s,
        max_bytes=policy.max_bytes,
        discard=DiscardPolicy.NEW,
        duplicate_window=policy.duplicate_window_s,
        allow_rollup_hdrs=True,
        allow_direct=True,
    )


def _stream(
    name: str, subject: str, policy: Retention, replicas: int, storage: StorageType
) -> StreamConfig:
    return StreamConfig(
        name=name,
        subjects=[subject],
        retention=RetentionPolicy.LIMITS,
        storage=storage,
        num_replicas=replicas,
        max_age=policy.max_age_s,
        max_bytes=policy.max_bytes,
        max_msg_size=policy.max_msg_bytes,
        discard=DiscardPolicy.NEW if policy.one_per_subject else DiscardPolicy.OLD,
        discard_new_per_subject=policy.one_per_subject,
        max_msgs_per_subject=1 if policy.one_per_subject else -1,
        duplicate_window=policy.duplicate_window_s,
        deny_delete=policy.deny_delete,
        deny_purge=policy.deny_purge,
    )


def consumer_config(subjects: Subjects, domain: Domain, limits: ConsumerLimits) -> ConsumerConfig:
    """The durable pull consumer all workers of a domain share."""
    name = subjects.durable(domain)
    return ConsumerConfig(
        name=name,
        durable_name=name,
        filter_subject=subjects.wildcard(domain),
        deliver_policy=DeliverPolicy.ALL,
        ack_policy=AckPolicy.EXPLICIT,
        ack_wait=limits.ack_wait_s,
        max_deliver=-1,
        max_ack_pending=limits.max_ack_pending,
    )
