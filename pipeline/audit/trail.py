"""The stored audit trail, read: its status, proofs, an export, and the sources `check` walks.

An export (`pipeline audit export DIR`) is a directory of four files:

- `events.bin`: each logged or stored event as `position (8 bytes) ‖ length (4) ‖ data`,
  where data is the event's canonical bytes (`leaf_data`: id, version, topic, state);
- `log.bin`: each log row as `index (8) ‖ position (8) ‖ length (2) ‖ hashes`;
- `checkpoints.jsonl`: one `{"size": N, "note": "<signed note>"}` per line;
- `manifest.json`: the origin, the counts, and the log's public keys as found in the
  settings (for reference: a verifier passes the keys it trusts with `--keys`).

All integers are big-endian. Everything is read in one repeatable-read snapshot.
"""

from __future__ import annotations

import base64
import bisect
import json
import mmap
import struct
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL

from . import merkle
from .log import leaf_data, logged_end, read_nodes, runs
from .tables import ROW_LEAVES, AuditTables

__all__ = [
    "AuditStatus",
    "consistency",
    "export",
    "exported",
    "live",
    "prove",
    "status",
]

_EVENT = struct.Struct(">QI")
_ROW = struct.Struct(">QQH")
_POSITION = struct.Struct(">Q")
_FETCH = 10_000


@dataclass(frozen=True)
class AuditStatus:
    """Where the audit trail stands."""

    store_head: int
    size: int
    position: int
    checkpoint_size: int
    checkpoint_age_s: float | None
    cosignatures: int

    def as_json(self) -> dict[str, Any]:
        return {
            "store_head": self.store_head,
            "log_size": self.size,
            "logged_position": self.position,
            "unlogged_events_before": self.store_head - self.position,
            "checkpoint_size": self.checkpoint_size,
            "unsigned_leaves": self.size - self.checkpoint_size,
            "checkpoint_age_s": self.checkpoint_age_s,
            "cosignatures_of_latest": self.cosignatures,
        }


def status(conn: psycopg.Connection[Any], tables: AuditTables) -> AuditStatus:
    """The log's size and position, the store's head and the latest checkpoint."""
    with conn.transaction():
        size, position = logged_end(conn, tables)
        row = conn.execute(
            SQL(
                "SELECT (SELECT coalesce(max(notification_id), 0) FROM {events}), "
                "c.size, extract(epoch FROM clock_timestamp() - c.signed_at), "
                "(SELECT count(*) FROM {cosigs} s WHERE s.size = c.size) "
                "FROM (SELECT NULL) AS one LEFT JOIN "
                "(SELECT size, signed_at FROM {checkpoints} ORDER BY size DESC LIMIT 1) AS c "
                "ON true"
            ).format(
                events=tables.events,
                checkpoints=tables.checkpoints,
                cosigs=tables.cosignatures,
            )
        ).fetchone()
    assert row is not None
    head, cp_size, age, cosigs = row
    return AuditStatus(
        head, size, position, cp_size or 0, float(age) if age is not None else None, cosigs or 0
    )


# -- proofs ---------------------------------------------------------------------------


def latest_checkpoint(
    conn: psycopg.Connection[Any], tables: AuditTables
) -> tuple[int, bytes, bytes] | None:
    """(size, root, signed note) of the latest checkpoint, or None."""
    row = conn.execute(
        SQL("SELECT size, root, note FROM {} ORDER BY size DESC LIMIT 1").format(tables.checkpoints)
    ).fetchone()
    return (row[0], bytes(row[1]), bytes(row[2])) if row else None


def prove(conn: psycopg.Connection[Any], tables: AuditTables, event: uuid.UUID) -> dict[str, Any]:
    """The inclusion proof of `event` against the latest checkpoint, as JSON-ready data.

    Raises LookupError when the event is not stored, not logged yet, or not covered by a
    checkpoint yet (each said).
    """
    with conn.transaction():
        # Two lookups by unique index each, whatever the planner's statistics say.
        found = conn.execute(
            SQL("SELECT notification_id FROM {} WHERE originator_id = %s").format(tables.events),
            (event,),
        ).fetchone()
        if found is None:
            raise LookupError(f"no stored event has the id {event}")
        position = found[0]
        index = _leaf_of(conn, tables, position)
        if index is None:
            raise LookupError(
                f"event {event} (position {position}) is not in the audit log yet; is "
                "`pipeline run audit` running? (`pipeline audit status`)"
            )
        checkpoint = latest_checkpoint(conn, tables)
        if checkpoint is None or checkpoint[0] <= index:
            raise LookupError(
                f"event {event} is leaf {index}, which no signed checkpoint covers yet; "
                "try again after the next checkpoint (`pipeline audit status`)"
            )
        size, root, note = checkpoint
        wanted = [(0, index), *merkle.inclusion_nodes(index, size)]
        nodes = dict(read_nodes(conn, tables, wanted))
    leaf = nodes[(0, index)]
    proof = merkle.inclusion_proof(index, size, nodes)
    merkle.verify_inclusion(index, size, leaf, proof, root)
    return {
        "event_id": str(event),
        "position": position,
        "leaf_index": index,
        "leaf_hash": _b64(leaf),
        "tree_size": size,
        "root": _b64(root),
        "proof": [_b64(h) for h in proof],
        "checkpoint": note.decode(),
    }


def _leaf_of(conn: psycopg.Connection[Any], tables: AuditTables, position: int) -> int | None:
    """The index of the leaf that logs the event at `position`, or None: the run that
    starts at or before it, by unique index, and the position looked up in it."""
    with conn.cursor(binary=True, row_factory=tuple_row) as curs:
        curs.execute(
            SQL(
                "SELECT idx, positions FROM {} WHERE position <= %s ORDER BY position DESC LIMIT 1"
            ).format(tables.leaves),
            (position,),
        )
        run = curs.fetchone()
    if run is None:
        return None
    idx, packed = run[0], bytes(run[1])
    logged = [p for (p,) in _POSITION.iter_unpack(packed[: len(packed) // 8 * 8])]
    k = bisect.bisect_left(logged, position)
    return idx + k if k < len(logged) and logged[k] == position else None


def consistency(
    conn: psycopg.Connection[Any], tables: AuditTables, old: int, new: int
) -> dict[str, Any]:
    """The consistency proof between the trees of `old` and `new` leaves (RFC 9162)."""
    if not 0 <= old <= new:
        raise ValueError(f"sizes must satisfy 0 <= OLD <= NEW (got {old} and {new})")
    with conn.transaction():
        have, _ = logged_end(conn, tables)
        if new > have:
            raise LookupError(f"the audit log has {have} leaves, fewer than {new}")
        wanted = (
            merkle.consistency_nodes(old, new)
            + merkle.CompactRange.edge(old)
            + merkle.CompactRange.edge(new)
        )
        nodes = dict(read_nodes(conn, tables, wanted))
    old_root, new_root = merkle.tree_root(old, nodes), merkle.tree_root(new, nodes)
    proof = merkle.consistency_proof(old, new, nodes)
    merkle.verify_consistency(old, new, old_root, new_root, proof)
    return {
        "old_size": old,
        "new_size": new,
        "old_root": _b64(old_root),
        "new_root": _b64(new_root),
        "proof": [_b64(h) for h in proof],
    }


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# -- sources ----------------------------------------------------------------------------


@dataclass
class Sources:
    """What `verify.check` walks: events, log rows and checkpoints, in order."""

    events: Iterator[tuple[int, bytes]]
    rows: Iterator[tuple[int, int, bytes]]
    checkpoints: list[tuple[int, bytes]]


def live(conn: psycopg.Connection[Any], tables: AuditTables) -> Sources:
    """The live trail. Call inside a repeatable-read transaction (one snapshot) and use the
    iterators before it ends."""
    checkpoints = [
        (size, bytes(note))
        for size, note in conn.execute(
            SQL("SELECT size, note FROM {} ORDER BY size").format(tables.checkpoints)
        ).fetchall()
    ]
    return Sources(_live_events(conn, tables), _live_rows(conn, tables), checkpoints)


def _live_events(conn: psycopg.Connection[Any], tables: AuditTables) -> Iterator[tuple[int, bytes]]:
    with conn.cursor("audit_events", binary=True, row_factory=tuple_row) as curs:
        curs.itersize = _FETCH
        curs.execute(
            SQL(
                "SELECT notification_id, originator_id, originator_version, topic, state "
                "FROM {} ORDER BY notification_id"
            ).format(tables.events)
        )
        for position, ident, version, topic, state in curs:
            yield position, leaf_data(ident, version, topic, state)


def _live_rows(
    conn: psycopg.Connection[Any], tables: AuditTables
) -> Iterator[tuple[int, int, bytes]]:
    with conn.cursor("audit_rows", binary=True, row_factory=tuple_row) as curs:
        curs.itersize = _FETCH // ROW_LEAVES  # runs of up to ROW_LEAVES leaves each
        curs.execute(
            SQL("SELECT idx, positions, hashes FROM {} ORDER BY idx").format(tables.leaves)
        )
        for idx, positions, hashes in curs:
            yield from runs(idx, bytes(positions), bytes(hashes))


def export(
    conn: psycopg.Connection[Any],
    tables: AuditTables,
    directory: Path,
    *,
    origin: str,
    keys: Sequence[str],
) -> dict[str, Any]:
    """Write the trail to `directory` (made; must be empty); the manifest."""
    directory.mkdir(parents=True, exist_ok=True)
    if any(directory.iterdir()):
        raise FileExistsError(f"{directory} is not empty; export into a new directory")
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        sources = live(conn, tables)
        events = rows = 0
        with (directory / "events.bin").open("wb") as out:
            for position, data in sources.events:
                out.write(_EVENT.pack(position, len(data)))
                out.write(data)
                events += 1
        with (directory / "log.bin").open("wb") as out:
            for idx, position, hashes in sources.rows:
                out.write(_ROW.pack(idx, position, len(hashes)))
                out.write(hashes)
                rows += 1
        with (directory / "checkpoints.jsonl").open("w") as out:
            for size, note in sources.checkpoints:
                out.write(json.dumps({"size": size, "note": note.decode()}) + "\n")
    manifest = {
        "format": "event-pipeline-audit-export/1",
        "origin": origin,
        "events": events,
        "leaves": rows,
        "checkpoints": len(sources.checkpoints),
        "keys": list(keys),
    }
    (directory / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def exported(directory: Path) -> tuple[Sources, dict[str, Any]]:
    """The trail in an export, and its manifest."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text())
        checkpoints = [
            (int(item["size"]), item["note"].encode())
            for item in map(json.loads, (directory / "checkpoints.jsonl").read_text().splitlines())
        ]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{directory} is not an audit export: {exc}") from None
    return (
        Sources(
            _read_events(directory / "events.bin"), _read_rows(directory / "log.bin"), checkpoints
        ),
        manifest,
    )


def _mapped(path: Path) -> Iterator[memoryview]:
    with path.open("rb") as f:
        if path.stat().st_size == 0:
            yield memoryview(b"")
            return
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                yield view
            finally:
                view.release()


def _read_events(path: Path) -> Iterator[tuple[int, bytes]]:
    for data in _mapped(path):
        at, end, head = 0, len(data), _EVENT.size
        unpack = _EVENT.unpack_from
        while at < end:
            if at + head > end:
                raise ValueError(f"{path}: cut short at byte {at}")
            position, length = unpack(data, at)
            at += head
            if at + length > end:
                raise ValueError(f"{path}: cut short at byte {at}")
            yield position, bytes(data[at : at + length])
            at += length


def _read_rows(path: Path) -> Iterator[tuple[int, int, bytes]]:
    for data in _mapped(path):
        at, end, head = 0, len(data), _ROW.size
        unpack = _ROW.unpack_from
        while at < end:
            if at + head > end:
                raise ValueError(f"{path}: cut short at byte {at}")
            idx, position, length = unpack(data, at)
            at += head
            if at + length > end:
                raise ValueError(f"{path}: cut short at byte {at}")
            yield idx, position, bytes(data[at : at + length])
            at += length
