"""The evidence bucket's definition and the evidence frames' helpers, without servers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

from nats.js.api import ObjectStoreConfig, StorageType, StreamConfig
from nats.js.client import JetStreamContext

from projections.incidents.evidence import StoredFrame, _header
from projections.incidents.frames import CONTENT_TYPES, EvidenceFrame
from schemas import FrameEncoding, FrameMetaV1
from streams import Subjects, evidence_bucket_config


class _Recorder:
    """Stands in for a JetStream context: keeps the stream config it is asked to add."""

    def __init__(self) -> None:
        self.added: list[StreamConfig] = []

    async def add_stream(self, config: StreamConfig) -> None:
        self.added.append(config)


def _as_nats_py_makes_it(bucket: str, **options: Any) -> StreamConfig:
    recorder = _Recorder()
    config = ObjectStoreConfig(**options)
    asyncio.run(JetStreamContext.create_object_store(recorder, bucket, config))  # type: ignore[arg-type]
    (made,) = recorder.added
    return made


def test_the_bucket_is_the_stream_nats_py_makes_for_an_object_store() -> None:
    """`pipeline streams apply` makes what `js.create_object_store` would, so that
    `js.object_store` opens it and other clients read it as a bucket."""
    ours = evidence_bucket_config(
        Subjects("acme"), replicas=3, max_bytes=5 * 1024**3, max_age_s=0.0
    )
    theirs = _as_nats_py_makes_it(
        "ACME_EVIDENCE", max_bytes=5 * 1024**3, replicas=3, storage=StorageType.FILE
    )
    for name in (
        "name",
        "subjects",
        "max_bytes",
        "storage",
        "num_replicas",
        "discard",
        "allow_rollup_hdrs",
        "allow_direct",
    ):
        assert getattr(ours, name) == getattr(theirs, name), name
    assert ours.name == "OBJ_ACME_EVIDENCE"
    assert not ours.max_age  # kept as long as the incidents, unless a setting says less


def test_the_bucket_keeps_frames_for_ever_by_default() -> None:
    config = evidence_bucket_config(Subjects())
    assert config.name == "OBJ_EVIDENCE"
    assert config.subjects == ["$O.EVIDENCE.C.>", "$O.EVIDENCE.M.>"]
    assert config.max_age == 0.0
    assert config.duplicate_window == 120.0  # as the server would set it: no drift


def test_object_headers_are_read_in_either_form() -> None:
    headers: dict[str, Any] = {"Frame-Id": ["f-1"], "Empty": [], "Plain": "x"}
    assert _header(headers, "Frame-Id") == "f-1"
    assert _header(headers, "Empty") is None
    assert _header(headers, "Plain") == "x"
    assert _header(None, "Frame-Id") is None
    assert StoredFrame(b"", {}).content_type == "application/octet-stream"


def test_each_frame_encoding_has_its_media_type() -> None:
    assert set(CONTENT_TYPES) == {e.value for e in FrameEncoding}
    meta = FrameMetaV1(
        id="f-1",
        camera="cam-1",
        sequence=0,
        captured_at="2026-11-30T23:00:00Z",
        width=640,
        height=480,
        encoding=FrameEncoding.PNG,
    )
    ident = uuid.uuid4()
    frame = EvidenceFrame(ident, ident, "f-1", "frames.v1.cam-1", 7, meta)
    assert frame.content_type == "image/png"
