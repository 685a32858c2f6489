"""Subject, stream and consumer names: the only place they are spelled out.

Subjects are `<domain>.v<major>.<source>`; each dead letter has a subject of its own,
`dlq.<domain>.<stream seq>.<stored ns>` (the source message's place and time in its
stream), so the DLQ stream can keep one letter per source message for ever. An optional
namespace prefixes every subject (`acme.security.v1.door-7`) and stream (`ACME_SECURITY`)
so several pipelines (or test runs) can share one NATS account.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

from schemas import Domain

__all__ = ["ParsedSubject", "SubjectError", "Subjects"]

_NAMESPACE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,31}$")
_TOKEN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAJOR = re.compile(r"^v([1-9][0-9]{0,2})$")


class SubjectError(ValueError):
    """A subject that does not follow `<domain>.v<major>.<source>`."""

    def __init__(self, subject: str, problem: str) -> None:
        super().__init__(f"subject {subject!r}: {problem}")
        self.subject = subject
        self.problem = problem


@dataclass(frozen=True)
class ParsedSubject:
    """A subject split into its parts."""

    domain: Domain
    major: int
    source: str


@dataclass(frozen=True)
class Subjects:
    """Names of subjects, streams and consumers, under an optional namespace."""

    namespace: str = ""
    consumer_prefix: str = "pipeline"

    def __post_init__(self) -> None:
        if self.namespace and not _NAMESPACE.match(self.namespace):
            raise ValueError(
                f"namespace {self.namespace!r} must be 1-32 lowercase letters, digits, '-' or '_'"
            )

    @property
    def _prefix(self) -> str:
        return f"{self.namespace}." if self.namespace else ""

    def subject(self, domain: Domain, major: int, source: str) -> str:
        """The subject a producer publishes to, e.g. `security.v1.door-7`."""
        if not _TOKEN.match(source):
            raise SubjectError(source, "source must be letters, digits, '.', '_' or '-'")
        return f"{self._prefix}{domain.value}.v{major}.{source}"

    def wildcard(self, domain: Domain) -> str:
        """Every subject of a domain, all majors and sources."""
        return f"{self._prefix}{domain.value}.>"

    def dead_letter(self, domain: Domain, stream_seq: int, stored_ns: int) -> str:
        """The subject of the dead letter of one source message (its seq and storage time)."""
        return f"{self._prefix}dlq.{domain.value}.{stream_seq}.{stored_ns}"

    def dead_letters(self, domain: Domain) -> str:
        """Every dead letter of a domain."""
        return f"{self._prefix}dlq.{domain.value}.>"

    def legacy_dead_letters(self, domain: Domain) -> str:
        """The one subject of all a domain's dead letters in releases before per-letter ones."""
        return f"{self._prefix}dlq.{domain.value}"

    def dead_letter_wildcard(self) -> str:
        """Every dead-letter subject."""
        return f"{self._prefix}dlq.>"

    def stream(self, domain: Domain) -> str:
        """Name of the stream holding a domain's messages."""
        return self._stream_name(domain.value)

    def dead_letter_stream(self) -> str:
        """Name of the dead-letter stream."""
        return self._stream_name("dlq")

    def audit_checkpoints(self) -> str:
        """The subject the audit log's signed checkpoints are copied to."""
        return f"{self._prefix}audit.checkpoints"

    def audit_stream(self) -> str:
        """Name of the stream keeping the copies of the audit log's checkpoints."""
        return self._stream_name("audit")

    def evidence_bucket(self) -> str:
        """Name of the object store bucket keeping the frames that are incidents' evidence
        (its stream is `OBJ_<bucket>`, as JetStream names an object store's)."""
        return self._stream_name("evidence")

    def durable(self, domain: Domain) -> str:
        """Name of the durable pull consumer shared by all workers of a domain."""
        return f"{self.consumer_prefix}-{domain.value}"

    def _stream_name(self, base: str) -> str:
        name = f"{self.namespace}_{base}" if self.namespace else base
        return name.upper().replace("-", "_")

    def parse(self, subject: str) -> ParsedSubject:
        """Split a subject into domain, major and source, or raise `SubjectError`."""
        return _parse(self._prefix, self.namespace, subject)


@functools.lru_cache(maxsize=8192)
def _parse(prefix: str, namespace: str, subject: str) -> ParsedSubject:
    # Cached: a deployment has a bounded set of sources, so few distinct subjects.
    if prefix:
        if not subject.startswith(prefix):
            raise SubjectError(subject, f"not in namespace {namespace!r}")
        subject_rest = subject[len(prefix) :]
    else:
        subject_rest = subject
    parts = subject_rest.split(".", 2)
    if len(parts) != 3:
        raise SubjectError(subject, "expected <domain>.v<major>.<source>")
    domain_token, major_token, source = parts
    try:
        domain = Domain(domain_token)
    except ValueError:
        raise SubjectError(subject, f"unknown domain {domain_token!r}") from None
    match = _MAJOR.match(major_token)
    if match is None:
        raise SubjectError(subject, f"version token {major_token!r} is not v<major>")
    if not _TOKEN.match(source):
        raise SubjectError(subject, f"source {source!r} is not a single valid token")
    return ParsedSubject(domain, int(match.group(1)), source)
