"""The audit log's follower: a Merkle leaf per stored event, in store order, and checkpoints.

The follower reads the events after the last logged position and appends one leaf per
event, in one transaction per batch: the leaves carry the event's position, so the log
is its own position and a batch is logged once or not at all (a crash, `kill -9`
included, leaves the log as it was before the batch or after it). Writers take the event
table's writers' lock before drawing positions, so events become visible in position order and
none is passed over.

A leaf is `SHA-256(0x00 ‖ leaf_data(event))`, where `leaf_data` is the stored event's
canonical bytes: its id (16 bytes), its version (8 bytes, big-endian), the length of its
topic (2 bytes, big-endian), the topic (UTF-8) and the stored state, byte for byte.
The follower has the database compute leaf hashes as it reads (`_LEAF_HASH`, the same
bytes), so the events' states never cross the wire to it; `pipeline audit verify`
recomputes every leaf from the events in Python (`leaf_data`), trusting neither.

Every `checkpoint_every` leaves, or `checkpoint_interval_s` after the first leaf no
checkpoint covers, the follower signs a checkpoint of the whole log with every signer
(the HSM's Ed25519 key and the ML-DSA-65 key) and stores it. When a signer cannot sign
(the HSM is away, the PIN is wrong), no checkpoint is made: events go on being stored
and logged, the age of the unsigned leaves grows (`pipeline_audit_checkpoint_age_seconds`)
and the follower tries again on the next round.
"""

from __future__ import annotations

import logging
import random
import struct
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL

from ..metrics import AuditMetrics
from ..store.follow import is_outage
from . import merkle
from .keys import SigningUnavailable
from .note import Checkpoint, Signer, sign_note
from .tables import ROW_LEAVES, AuditTables

__all__ = ["AuditLog", "Logged", "leaf_data", "logged_end", "read_edge", "read_nodes", "runs"]

log = logging.getLogger(__name__)

Connect = Callable[[], "psycopg.Connection[Any]"]

_HEAD = struct.Struct(">QH")
_POSITION = struct.Struct(">Q")
_LEAF_HASH = (
    "sha256('\\x00'::bytea || uuid_send(originator_id) || int8send(originator_version::int8) "
    "|| substring(int4send(octet_length(convert_to(topic, 'UTF8'))) FROM 3) "
    "|| convert_to(topic, 'UTF8') || state)"
)
"""`merkle.leaf_hash(leaf_data(event))`, computed by the database from the event's row."""
_GATHER_S = 0.1
"""At the head of the store, how long new commits gather before the next batch: fewer,
larger transactions beside the writers, for a log at most this much later."""
_SIGN_RETRY_S = 2.0
"""After a key could not sign, how long until it is asked again."""


def leaf_data(originator_id: uuid.UUID, version: int, topic: str, state: bytes) -> bytes:
    """The canonical bytes of a stored event, the data of its leaf."""
    name = topic.encode()
    return originator_id.bytes + _HEAD.pack(version, len(name)) + name + bytes(state)


@dataclass(frozen=True)
class Logged:
    """Where the log stands: its size, the last logged position, the latest checkpoint."""

    size: int
    position: int
    checkpoint_size: int
    checkpoint_root: bytes | None
    root: bytes


def logged_end(conn: psycopg.Connection[Any], tables: AuditTables) -> tuple[int, int]:
    """The stored log's size and the position of its last leaf ((0, 0): empty)."""
    with conn.cursor(binary=True, row_factory=tuple_row) as curs:
        curs.execute(
            SQL(
                "SELECT idx + octet_length(positions) / 8, "
                "substring(positions FROM octet_length(positions) - 7) "
                "FROM {} ORDER BY idx DESC LIMIT 1"
            ).format(tables.leaves)
        )
        last = curs.fetchone()
    if last is None:
        return 0, 0
    return last[0], _POSITION.unpack(bytes(last[1]).rjust(_POSITION.size, b"\0"))[0]


def read_edge(conn: psycopg.Connection[Any], tables: AuditTables, size: int) -> merkle.CompactRange:
    """The right edge of the stored log of `size` leaves, read in one query."""
    return merkle.CompactRange(
        size, [h for _, h in read_nodes(conn, tables, merkle.CompactRange.edge(size))]
    )


def read_nodes(
    conn: psycopg.Connection[Any], tables: AuditTables, nodes: Sequence[tuple[int, int]]
) -> list[tuple[tuple[int, int], bytes]]:
    """The stored hashes of `nodes` ((level, n) pairs), in the order asked, in one query:
    for each, its leaf's row by index, and 32 bytes of it at the node's offset."""
    where = [merkle.node_row(level, n) for level, n in nodes]
    rows: dict[int, bytes] = {}
    if where:
        leaves = [leaf for leaf, _ in where]
        offsets = [merkle.HASH_SIZE * merkle.stored_offset(leaf) + at for leaf, at in where]
        with conn.cursor(binary=True, row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT q.i, substring(r.hashes FROM (q.at - %s * "
                    "(2 * r.idx - bit_count(r.idx::bit(64))) + 1)::int4 FOR %s::int4) "
                    "FROM unnest(%s::int8[], %s::int8[]) WITH ORDINALITY q(leaf, at, i) "
                    "JOIN LATERAL (SELECT idx, positions, hashes FROM {} WHERE idx <= q.leaf "
                    "ORDER BY idx DESC LIMIT 1) r ON q.leaf < r.idx + octet_length(r.positions) / 8"
                ).format(tables.leaves),
                (merkle.HASH_SIZE, merkle.HASH_SIZE, leaves, offsets),
            )
            rows = {i: bytes(value) for i, value in curs.fetchall()}
    found = []
    for i, (node, (leaf, _)) in enumerate(zip(nodes, where, strict=True), start=1):
        value = rows.get(i)
        if value is None or len(value) != merkle.HASH_SIZE:
            raise LookupError(f"the audit log has no hash of node {node} (leaf {leaf})")
        found.append((node, value))
    return found


def runs(idx: int, positions: bytes, hashes: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The leaves of one stored run as (index, position, stored hashes). A run whose
    lengths do not add up gives its last leaf the bytes left over (so that leaf's hashes
    are found altered), rather than failing."""
    count = len(positions) // _POSITION.size
    start = merkle.stored_offset(idx)
    at = 0
    for k in range(count):
        end = merkle.HASH_SIZE * (merkle.stored_offset(idx + k + 1) - start)
        if k == count - 1:
            end = len(hashes)
        value = hashes[at:end]
        if k == count - 1 and len(positions) % _POSITION.size:
            value += positions[count * _POSITION.size :]
        yield idx + k, _POSITION.unpack_from(positions, k * _POSITION.size)[0], value
        at = end


class AuditLog:
    """Appends the store's events to the Merkle log and signs checkpoints of it."""

    def __init__(
        self,
        schema: str,
        *,
        origin: str,
        signers: Callable[[], Sequence[Signer]],
        checkpoint_every: int = 10_000,
        checkpoint_interval_s: float = 10.0,
        batch_size: int = 5000,
        poll_s: float = 1.0,
        metrics: AuditMetrics | None = None,
    ) -> None:
        self.tables = AuditTables(schema)
        self.origin = origin
        self.signers = signers
        """The keys to sign with (raises `SigningUnavailable` while one cannot be had)."""
        self.checkpoint_every = checkpoint_every
        self.checkpoint_interval_s = checkpoint_interval_s
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.metrics = metrics or AuditMetrics()
        self.wake = threading.Event()
        """Set to end the wait at the head of the store early (a stop)."""
        self.connected = threading.Event()
        """Set while the last attempt to reach the database succeeded."""
        self._edge: merkle.CompactRange | None = None
        self._position = 0
        self._checkpoint_size = 0
        self._unsigned_since: float | None = None
        self._last_problem = ""
        self._sign_again = 0.0
        self._at_head = False
        """Whether the last batch read all there was (fewer events than it asked for)."""
        t = self.tables
        # The log's stored size beside the next events, in one statement: a follower
        # at the head asks once per round, and learns whether the log moved too. The
        # events come back as one row: their positions (8 bytes each, big-endian, as
        # `audit_leaves.positions` keeps them) and their leaf hashes, each end to end in
        # position order (the subquery's, which the aggregates take their rows in; `step`
        # checks it). One row rather than one per event: 0.3 rather than 0.85 µs an event
        # in the follower's process, 3.5-4.1 rather than 4.2-4.75 in the database.
        self._read = SQL(
            "SELECT s.size, e.positions, e.leaves FROM (SELECT coalesce((SELECT idx + "
            "octet_length(positions) / 8 FROM {} ORDER BY idx DESC LIMIT 1), 0) AS size) s, "
            "LATERAL (SELECT string_agg(int8send(notification_id), ''::bytea) AS positions, "
            "string_agg(leaf, ''::bytea) AS leaves FROM (SELECT notification_id, "
            + _LEAF_HASH
            + " AS leaf FROM {} WHERE notification_id > %s ORDER BY notification_id LIMIT %s) n) e"
        ).format(t.leaves, t.events)
        self._copy = SQL(
            "COPY {} (idx, position, positions, hashes) FROM STDIN (FORMAT BINARY)"
        ).format(t.leaves)

    # -- the log's state -----------------------------------------------------------------

    def load(self, conn: psycopg.Connection[Any]) -> Logged:
        """Read where the stored log stands (after a start, or a failed transaction).

        `conn` is the follower's own from now on: its commits stop waiting for the disk.
        Leaves are made again from the events if a crash loses them, and a checkpoint's
        commit, which does wait, makes every leaf before it durable; beside the writers'
        own commits, a wait per batch cost the event path its share of the disk."""
        conn.execute("SET synchronous_commit = off")
        size, position = logged_end(conn, self.tables)
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL("SELECT size, root FROM {} ORDER BY size DESC LIMIT 1").format(
                    self.tables.checkpoints
                )
            )
            checkpoint = curs.fetchone()
        self._edge = read_edge(conn, self.tables, size)
        self._position = position
        self._checkpoint_size = checkpoint[0] if checkpoint else 0
        if size > self._checkpoint_size and self._unsigned_since is None:
            self._unsigned_since = time.monotonic()
        self.metrics.size.set(size)
        self.metrics.checkpoint_size.set(self._checkpoint_size)
        return Logged(
            size,
            position,
            self._checkpoint_size,
            bytes(checkpoint[1]) if checkpoint else None,
            self._edge.root(),
        )

    @property
    def size(self) -> int:
        return self._edge.size if self._edge is not None else 0

    # -- one batch -----------------------------------------------------------------------

    def step(self, conn: psycopg.Connection[Any]) -> int:
        """Append the leaves of the next batch of stored events; how many (0 at the head)."""
        started = time.perf_counter()
        if self._edge is None:
            self.load(conn)
        assert self._edge is not None
        # A batch ends where a checkpoint falls due, so one comes every
        # `checkpoint_every` leaves exactly.
        unsigned = self._edge.size - self._checkpoint_size
        limit = self.batch_size
        if unsigned < self.checkpoint_every:
            limit = min(limit, self.checkpoint_every - unsigned)
        try:
            with conn.cursor(binary=True, row_factory=tuple_row) as curs:
                curs.execute(self._read, (self._position, limit), prepare=True)
                size, packed, leaves = curs.fetchone() or (0, None, None)
            count = len(packed) // _POSITION.size if packed else 0
            self._at_head = count < limit
            if size != self._edge.size:
                raise _Moved
            if not count:
                return 0
            positions = struct.unpack(f">{count}Q", packed)
            width = merkle.HASH_SIZE
            hashes = [leaves[at : at + width] for at in range(0, len(leaves), width)]
            if (
                list(positions) != sorted(positions)
                or positions[0] <= self._position
                or len(hashes) != count
            ):
                raise RuntimeError(f"audit: the events after {self._position} came out of order")
            edge = self._edge
            start = edge.size
            blobs = [
                (at, edge.extend(hashes[at : at + ROW_LEAVES]))
                for at in range(0, count, ROW_LEAVES)
            ]
            # One statement, so one transaction: the batch is logged whole or not at all;
            # the log's keys refuse rows that another process appended since the read.
            # (Not waiting for the disk: see `load`.)
            with conn.cursor() as curs, curs.copy(self._copy) as copy:
                copy.set_types(["int8", "int8", "bytea", "bytea"])
                for at, stored in blobs:
                    run = packed[_POSITION.size * at : _POSITION.size * (at + ROW_LEAVES)]
                    copy.write_row((start + at, positions[at], run, stored))
        except _Moved:
            log.warning("audit: the log grew in another process; reading it again")
            self.load(conn)
            return 0
        except BaseException:
            self._edge = None  # the stored log is what counts: read it again
            raise
        self._position = positions[-1]
        if self._unsigned_since is None:
            self._unsigned_since = time.monotonic()
        m = self.metrics
        m.leaves.inc(count)
        m.size.set(self._edge.size)
        m.position.set(self._position)
        m.batch_seconds.observe(time.perf_counter() - started)
        return count

    # -- checkpoints ---------------------------------------------------------------------

    def due(self) -> bool:
        """Whether the leaves not yet signed call for a checkpoint now."""
        unsigned = self.size - self._checkpoint_size
        if unsigned <= 0:
            return False
        if unsigned >= self.checkpoint_every:
            return True
        since = self._unsigned_since
        return since is not None and time.monotonic() - since >= self.checkpoint_interval_s

    def checkpoint(self, conn: psycopg.Connection[Any]) -> bytes | None:
        """Sign and store a checkpoint of the whole log; the note, or None when a signer
        cannot sign now (said in the log once per cause; tried again next round)."""
        if self._edge is None:
            self.load(conn)
        assert self._edge is not None
        body = Checkpoint(self.origin, self._edge.size, self._edge.root()).body()
        try:
            note = self._sign(body)
        except SigningUnavailable as exc:
            self.metrics.signing_failures.inc()
            problem = str(exc)
            if problem != self._last_problem:
                log.error(
                    "audit: no checkpoint signed (%s); events are still stored and logged, "
                    "the checkpoint will be signed once the key answers",
                    problem,
                )
                self._last_problem = problem
            return None
        if self._last_problem:
            log.info("audit: signing again")
            self._last_problem = ""
        with conn.transaction():
            # The server's and the role's setting again: this commit waits for the disk
            # (and the synchronous standbys), and so makes every leaf before it durable.
            conn.execute("SET LOCAL synchronous_commit TO DEFAULT")
            conn.execute(
                SQL(
                    "INSERT INTO {} (size, root, note) VALUES (%s, %s, %s) ON CONFLICT DO NOTHING"
                ).format(self.tables.checkpoints),
                (self._edge.size, self._edge.root(), note),
            )
        self._checkpoint_size = self._edge.size
        self._unsigned_since = None
        self.metrics.checkpoint_size.set(self._checkpoint_size)
        self.metrics.checkpoints.inc()
        log.info("audit: checkpoint of %d leaves signed", self._checkpoint_size)
        return note

    def _sign(self, body: bytes) -> bytes:
        """The note signed by every key: one that cannot sign fails it all."""
        return sign_note(body, [_Timed(signer, self.metrics) for signer in self.signers()])

    def checkpoint_age(self) -> float:
        """Seconds since the first leaf that no checkpoint covers was logged (0: none)."""
        since = self._unsigned_since
        return 0.0 if since is None else time.monotonic() - since

    # -- as a thread ---------------------------------------------------------------------

    def run(self, connect: Connect, stop: threading.Event, *, standby_s: float = 5.0) -> None:
        """Keep the log current and signed until `stop` is set; stand by while another
        process keeps it."""
        delay = 0.5
        conn: psycopg.Connection[Any] | None = None
        lock_key = f"audit:{self.tables.schema}"
        stop.wait(random.uniform(0, 0.2))
        while not stop.is_set():
            self.metrics.checkpoint_age.set(self.checkpoint_age())
            try:
                if conn is None:
                    conn = connect()
                    self.connected.set()
                    taken = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key,))
                    row = taken.fetchone()
                    if not (row and row[0]):
                        self.metrics.active.set(0)
                        conn.close()
                        conn = None
                        stop.wait(standby_s)
                        continue
                    self.metrics.active.set(1)
                    self.load(conn)
                    log.info("audit: log kept by this process (%d leaves)", self.size)
                self.wake.clear()
                appended = self.step(conn)
                signing = self.due() and time.monotonic() >= self._sign_again
                if signing and self.checkpoint(conn) is None:  # logging goes on; retried
                    self._sign_again = time.monotonic() + _SIGN_RETRY_S
                if self._at_head:  # let a few commits gather into the next batch
                    if not appended:
                        self.wake.wait(self.poll_s)
                    stop.wait(_GATHER_S)
                delay = 0.5
            except Exception as exc:
                if is_outage(exc, conn):
                    self.connected.clear()
                    log.warning("audit: database away (%s); again in %.1f s", exc, delay)
                else:
                    log.exception("audit: unexpected error; again in %.1f s", delay)
                self.metrics.active.set(0)
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
        if conn is not None:
            conn.close()


class _Timed:
    """A signer whose signing time is observed."""

    def __init__(self, signer: Signer, metrics: AuditMetrics) -> None:
        self._signer, self._metrics = signer, metrics
        self.name, self.key_id = signer.name, signer.key_id
        self.sig_type, self.public_key = signer.sig_type, signer.public_key

    def sign(self, message: bytes) -> bytes:
        started = time.perf_counter()
        signature = self._signer.sign(message)
        self._metrics.sign_seconds.labels(self.name).observe(time.perf_counter() - started)
        return signature


class _Moved(Exception):
    """The stored log is not where this process thought (another process appended)."""
