"""Camera activity: frames analysed and skipped, detections per label and minute, the model."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal
from typing import Any

import psycopg

from pipeline.store.domain import CameraFrame
from pipeline.store.reader import Positioned

from .view import Table, Tables, View, add_exact, decimal, minute, parse_time, upsert

__all__ = ["CameraView"]

_ACTIVITY = (
    "camera",
    "frames_analysed",
    "frames_skipped",
    "detections",
    "inference_ms_sum",
    "last_frame_at",
    "model_name",
    "model_sha256",
    "model_position",
    "position",
)
# The model is the one of the frame analysed last (in store order).
_MERGE_ACTIVITY = (
    "frames_analysed = t.frames_analysed + excluded.frames_analysed, "
    "frames_skipped = t.frames_skipped + excluded.frames_skipped, "
    "detections = t.detections + excluded.detections, "
    "inference_ms_sum = t.inference_ms_sum + excluded.inference_ms_sum, "
    "last_frame_at = greatest(t.last_frame_at, excluded.last_frame_at), "
    "model_name = coalesce(excluded.model_name, t.model_name), "
    "model_sha256 = coalesce(excluded.model_sha256, t.model_sha256), "
    "model_position = coalesce(excluded.model_position, t.model_position), "
    "position = excluded.position"
)
_DETECTIONS = ("camera", "label", "minute", "detections", "frames")


class CameraView(View):
    """Per camera, and per camera, label and minute (of capture)."""

    name = "cameras"
    description = "frames analysed and skipped, detections per label per minute, model in use"
    events = (CameraFrame.FrameAnalyzed, CameraFrame.FrameSkipped)
    tables = (
        Table(
            "camera_activity",
            "camera text PRIMARY KEY, frames_analysed bigint NOT NULL, "
            "frames_skipped bigint NOT NULL, detections bigint NOT NULL, "
            "inference_ms_sum numeric NOT NULL, last_frame_at timestamptz NOT NULL, "
            "model_name text, model_sha256 text, model_position bigint, position bigint NOT NULL",
        ),
        Table(
            "camera_detections",
            "camera text NOT NULL, label text NOT NULL, minute timestamptz NOT NULL, "
            "detections bigint NOT NULL, frames bigint NOT NULL, "
            "PRIMARY KEY (camera, label, minute)",
            indexes=("minute DESC",),
        ),
    )

    def apply(self, curs: psycopg.Cursor[Any], tables: Tables, batch: Sequence[Positioned]) -> None:
        """Count the batch's frames per camera and detections per label and minute."""
        activity: dict[str, list[Any]] = {}
        detections: dict[tuple[str, str, datetime], list[int]] = {}
        for item in batch:
            p = item.event.payload
            frame = p["frame"]
            camera = frame["camera"]
            at = parse_time(frame["captured_at"])
            row = activity.get(camera)
            if row is None:
                row = activity[camera] = [0, 0, 0, Decimal(0), at, None, None, None, 0]
            row[4] = max(row[4], at)
            row[8] = item.position
            if isinstance(item.event, CameraFrame.FrameSkipped):
                row[1] += 1
                continue
            found = p["detections"]
            row[0] += 1
            row[2] += len(found)
            row[3] = add_exact(row[3], decimal(p["inference_ms"]))
            row[5], row[6], row[7] = p["model"]["name"], p["model"]["sha256"], item.position
            start = minute(at)
            for label in {d["label"] for d in found}:
                counts = detections.setdefault((camera, label, start), [0, 0])
                counts[1] += 1
            for d in found:
                detections[(camera, d["label"], start)][0] += 1
        upsert(
            curs,
            tables,
            "camera_activity",
            _ACTIVITY,
            ("camera",),
            _MERGE_ACTIVITY,
            [(camera, *row) for camera, row in activity.items()],
        )
        upsert(
            curs,
            tables,
            "camera_detections",
            _DETECTIONS,
            ("camera", "label", "minute"),
            "detections = t.detections + excluded.detections, frames = t.frames + excluded.frames",
            [(*key, *counts) for key, counts in detections.items()],
        )
