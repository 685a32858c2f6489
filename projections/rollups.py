"""Metric rollups per service, instance, metric, label set and minute.

Each minute holds the count, sum, min, max and last of its samples. Sums are exact
(`numeric`, added as decimals): a float sum would depend on how events fell into
batches, and a rebuild must give what the live run gave.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import orjson
import psycopg

from pipeline.store.domain import MetricsBatch
from pipeline.store.reader import Positioned

from .view import Table, Tables, View, add_exact, decimal, json, minute, parse_time, upsert

__all__ = ["RollupView"]


_COLUMNS = (
    "service",
    "instance",
    "name",
    "labels_hash",
    "labels",
    "minute",
    "samples",
    "sum",
    "min",
    "max",
    "last",
    "last_at",
)
_KEY = ("service", "instance", "name", "labels_hash", "minute")
# `last` is the value collected last; of two collected at the same time, the one stored last.
_MERGE = (
    "samples = t.samples + excluded.samples, sum = t.sum + excluded.sum, "
    "min = least(t.min, excluded.min), max = greatest(t.max, excluded.max), "
    "last = CASE WHEN excluded.last_at >= t.last_at THEN excluded.last ELSE t.last END, "
    "last_at = greatest(t.last_at, excluded.last_at)"
)


def _hash(labels: str) -> str:
    """The key of a label set (its sorted JSON): a label set may be too large for an index."""
    return hashlib.sha256(labels.encode()).hexdigest()[:32]


class RollupView(View):
    """Samples of metrics batches, rolled up per minute of their collection time."""

    name = "metrics"
    description = "per service, instance, metric, label set and minute: count, sum, min, max, last"
    events = (MetricsBatch.Recorded,)
    tables = (
        Table(
            "metric_rollups",
            "service text NOT NULL, instance text NOT NULL, name text NOT NULL, "
            "labels_hash text NOT NULL, labels jsonb NOT NULL, minute timestamptz NOT NULL, "
            "samples bigint NOT NULL, "
            "sum numeric NOT NULL, min double precision NOT NULL, "
            "max double precision NOT NULL, last double precision NOT NULL, "
            "last_at timestamptz NOT NULL, "
            "PRIMARY KEY (service, instance, name, labels_hash, minute)",
            indexes=("name, minute DESC", "minute DESC"),
        ),
    )

    def apply(self, curs: psycopg.Cursor[Any], tables: Tables, batch: Sequence[Positioned]) -> None:
        """Roll the batch's samples up in memory, then merge them into the stored minutes."""
        rolled: dict[tuple[str, str, str, str, datetime], list[Any]] = {}
        labels_of: dict[str, Any] = {}
        for item in batch:
            p = item.event.payload
            at = parse_time(p["collected_at"])
            start = minute(at)
            for sample in p["samples"]:
                labels = sample.get("labels") or {}
                labels_key = orjson.dumps(labels, option=orjson.OPT_SORT_KEYS).decode()
                labels_of.setdefault(labels_key, labels)
                key = (p["service"], p["instance"], sample["name"], labels_key, start)
                value = float(sample["value"])
                row = rolled.get(key)
                if row is None:
                    rolled[key] = [1, decimal(value), value, value, value, at]
                    continue
                row[0] += 1
                row[1] = add_exact(row[1], decimal(value))
                row[2] = min(row[2], value)
                row[3] = max(row[3], value)
                if at >= row[5]:
                    row[4], row[5] = value, at
        upsert(
            curs,
            tables,
            "metric_rollups",
            _COLUMNS,
            _KEY,
            _MERGE,
            [
                (s, i, n, _hash(labels), json(labels_of[labels]), m, *row)
                for (s, i, n, labels, m), row in rolled.items()
            ],
        )
