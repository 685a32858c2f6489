"""Decode a message body of a JSON domain into its current model, or say why not."""

from __future__ import annotations

from pydantic import BaseModel, ValidationError

from schemas import SCHEMAS, Domain
from streams import SubjectError, Subjects

from ..errors import Reason, Rejected

__all__ = ["decode", "validation_summary"]

_MAX_ERRORS = 5


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
) -> BaseModel:
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
    try:
        message = model.model_validate_json(body)
    except ValidationError as exc:
        if any(e["type"] == "json_invalid" for e in exc.errors()):
            raise Rejected(Reason.INVALID_JSON, validation_summary(exc)) from None
        raise Rejected(Reason.SCHEMA_VIOLATION, validation_summary(exc)) from None
    return schema.upcast(parsed.major, message)
