"""Write the JSON Schema of every message model, the AsyncAPI document of the subscribers and
the OpenAPI document of the query API."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from faststream.nats import NatsBroker
from faststream.specification import AsyncAPI
from pydantic import BaseModel

import handlers
from schemas import SCHEMAS, Domain, FrameAnalyzedV1, FrameSkippedV1
from streams import Subjects

from ..api import create_app
from ..ingest.intake import Delivery
from ..settings import ALL_DOMAINS, EVENT_DOMAINS, Settings
from ..store.domain import aggregate_class

__all__ = ["export_schemas"]


class _Described:
    """Stands in for an intake when the broker is built only to be described."""

    def __init__(self, domain: Domain) -> None:
        self.domain = domain

    async def handle(self, batch: Sequence[Delivery]) -> None:
        raise RuntimeError("a broker built for its specification does not consume")


def _version(domain: Domain, event: str) -> int:
    """The payload version (`class_version`) of one of a domain's event classes."""
    version: int = getattr(getattr(aggregate_class(domain), event), "class_version", 1)
    return version


def export_schemas(directory: Path, settings: Settings) -> list[Path]:
    """Write `<domain>.v<major>.json` for every inbound model, `event.<Event>.v<N>.json` for
    the stored events' payloads (N: the payload version), `asyncapi.json` (the subjects
    consumed) and `openapi.json` (the query API); returns the paths."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for domain, schema in SCHEMAS.items():
        for major, model in schema.versions.items():
            path = directory / f"{domain.value}.v{major}.json"
            path.write_text(json.dumps(model.model_json_schema(), indent=2) + "\n")
            written.append(path)
    # Payloads of the stored events, in their current versions, for readers of the store.
    payloads: list[tuple[str, int, type[BaseModel]]] = [
        (f"{aggregate_class(d).__name__}.Recorded", _version(d, "Recorded"), SCHEMAS[d].payload)
        for d in EVENT_DOMAINS
    ]
    payloads += [
        ("CameraFrame.FrameAnalyzed", _version(Domain.FRAMES, "FrameAnalyzed"), FrameAnalyzedV1),
        ("CameraFrame.FrameSkipped", _version(Domain.FRAMES, "FrameSkipped"), FrameSkippedV1),
    ]
    for name, version, payload in payloads:
        path = directory / f"event.{name}.v{version}.json"
        path.write_text(json.dumps(payload.model_json_schema(), indent=2) + "\n")
        written.append(path)
    subjects = Subjects(settings.namespace)
    broker = NatsBroker(settings.nats_servers(), logger=None)
    for domain in ALL_DOMAINS:
        handlers.register(broker, _Described(domain), settings, subjects)
    spec = AsyncAPI(
        broker,
        title="event-pipeline",
        version="0.1.0",
        description="Subjects the pipeline consumes.",
    )
    path = directory / "asyncapi.json"
    path.write_text(json.dumps(json.loads(spec.to_specification().to_json()), indent=2) + "\n")
    written.append(path)
    path = directory / "openapi.json"
    path.write_text(json.dumps(create_app(settings).openapi(), indent=2) + "\n")
    written.append(path)
    return written
