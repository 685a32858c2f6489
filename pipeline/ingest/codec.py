"""Decode a message body of a JSON domain into the payload to store, or say why not.

A message is validated against the model of its subject's major, upcast to the current
major and stored as its payload (the model without `id` and `schema_version`, which the
event keeps beside it; `schema_version` as the producer sent it).

A producer may be one minor version ahead of the pipeline (`"1.1"` where the pipeline
knows `"1.0"`): its new top-level fields are kept in the payload as they were sent, so
nothing it says is lost, and the message is validated without them. Within a version
the pipeline knows, an unknown field is refused (most likely a typo). Kept fields must
be plain JSON nested at most `MAX_DEPTH` deep, with integers in the signed 64-bit range.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from schemas import SCHEMAS, Domain
from schemas.common import INT64_MAX, INT64_MIN
from streams import SubjectError, Subjects

from ..errors import Reason, Rejected

__all__ = ["MAX_DEPTH", "Decoded", "decode", "validation_summary"]

_MAX_ERRORS = 5
MAX_DEPTH = 8
"""How deeply fields kept from a newer minor version may nest."""


@dataclass(slots=True)
class Decoded:
    """A valid message: its id, the version its producer sent, and the payload to store."""

    message_id: str
    schema_version: str
    payload: dict[str, Any]


def validation_summary(exc: ValidationError) -> str:
    """The first few validation errors, one line: `field: problem; ...`."""
    parts = []
    for error in exc.errors(include_url=False)[:_MAX_ERRORS]:
        where = ".".join(str(p) for p in error["loc"]) or "body"
        parts.append(f"{where}: {error['msg']}")
    more = exc.error_count() - _MAX_ERRORS
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)


def decode(
    subjects: Subjects, domain: Domain, subject: str, body: bytes, *, max_bytes: int
) -> Decoded:
    """Validate `body` against the model of the subject's major, then upcast it.

    Raises `Rejected` with the reason a dead letter should carry.
    """
    try:
        parsed = subjects.parse(subject)
    except SubjectError as exc:
        raise Rejected(Reason.BAD_SUBJECT, str(exc)) from None
    if parsed.domain is not domain:
        raise Rejected(Reason.BAD_SUBJECT, f"subject {subject!r} is not a {domain} subject")
    schema = SCHEMAS[domain]
    model = schema.versions.get(parsed.major)
    if model is None:
        supported = ", ".join(f"v{m}" for m in sorted(schema.versions))
        raise Rejected(
            Reason.UNSUPPORTED_VERSION, f"{domain} v{parsed.major} is not supported ({supported})"
        )
    if len(body) > max_bytes:
        raise Rejected(Reason.OVERSIZED, f"body is {len(body)} bytes, the limit is {max_bytes}")
    extra: dict[str, Any] = {}
    try:
        message = model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise Rejected(Reason.INVALID_JSON, validation_summary(exc)) from None
        message, extra = _newer_minor(model, body, exc)
    sent: Any = message  # every inbound model is a `schemas.Message`
    payload = schema.upcast(parsed.major, message).model_dump(mode="json")
    del payload["id"], payload["schema_version"]  # the envelope (faster than `exclude=`)
    if extra:
        payload.update(extra)
    return Decoded(sent.id, sent.schema_version, payload)


def _newer_minor(
    model: type[BaseModel], body: bytes, exc: ValidationError
) -> tuple[BaseModel, dict[str, Any]]:
    """Validate a message of a newer minor without its new top-level fields; those are kept.

    Raises `Rejected(SCHEMA_VIOLATION)` unless the message is of a newer minor and its
    only problem is unknown top-level fields.
    """
    violation = Rejected(Reason.SCHEMA_VIOLATION, validation_summary(exc))
    unknown = {
        str(e["loc"][0])
        for e in exc.errors()
        if e["type"] == "extra_forbidden" and len(e["loc"]) == 1
    }
    document = json.loads(body)  # valid JSON (pydantic parsed it); big integers intact
    if not unknown or not isinstance(document, dict) or not _is_newer(model, document):
        raise violation
    extra = {name: document.pop(name) for name in unknown}
    try:
        message = model.model_validate_json(json.dumps(document))
    except ValidationError as again:
        raise Rejected(Reason.SCHEMA_VIOLATION, validation_summary(again)) from None
    for name, value in extra.items():
        problem = _unstorable(value, MAX_DEPTH)
        if problem:
            raise Rejected(Reason.SCHEMA_VIOLATION, f"{name}: {problem}")
    return message, extra


def _is_newer(model: type[BaseModel], document: dict[str, Any]) -> bool:
    version = document.get("schema_version")
    if not isinstance(version, str):
        return False
    _, _, minor = version.partition(".")
    known: int = getattr(model, "MINOR", 0)
    return minor.isdigit() and int(minor) > known


def _unstorable(value: Any, depth: int) -> str:
    """Why a kept JSON value cannot be stored as it is; empty if it can."""
    if depth < 0:
        return f"nested more than {MAX_DEPTH} levels deep"
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return ""
    if isinstance(value, float):
        return "" if math.isfinite(value) else "not a finite number"
    if isinstance(value, int):
        return "" if INT64_MIN <= value <= INT64_MAX else "integer beyond 64 bits"
    items = value.values() if isinstance(value, dict) else value
    for item in items:
        problem = _unstorable(item, depth - 1)
        if problem:
            return problem
    return ""
