"""Keeping a view current: batches of events applied with the position, in one transaction.

A `ViewRunner` applies the events after its view's position in batches. Each batch is
one transaction: lock the view's position row, read the next events, change the view's
tables, move the position, commit. A crash at any point leaves the view and its
position as they were before the batch, or after it; never in between.

An event the view cannot apply (its code raises, or PostgreSQL refuses the rows) is
found by halving the batch, and stops that view only: the view is marked stalled at the
event's position, which is logged and exported; the other views go on. A restart tries
the event once more; `pipeline projections skip VIEW POS` moves past it on purpose.
A database that is down or restarting is not the event's fault: the runner reconnects
with backoff and goes on where the committed position says.

New events wake the runners through PostgreSQL's LISTEN/NOTIFY (the writers notify on
every commit); they also poll every `poll_s`, so a lost notification delays a view by
at most that long.
"""

from __future__ import annotations

import gc
import logging
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg.sql import SQL

from pipeline.metrics import ProjectionMetrics
from pipeline.store.follow import Listener, is_outage
from pipeline.store.reader import EventReader

from .positions import Positions
from .view import SHADOW, Tables, View

__all__ = [
    "Listener",
    "ViewRunner",
    "ViewStalled",
    "create_indexes",
    "create_tables",
    "is_outage",
]

log = logging.getLogger(__name__)

Connect = Callable[[], "psycopg.Connection[Any]"]

_WINDOW = (4, 64)
"""A batch reads at most this many times its size of positions (of any topic): it starts
at the first and doubles, up to the second, while the view's events are sparser."""


class _CollectorPause:
    """Python's cyclic garbage collector off while any runner applies a batch.

    A batch makes tens of thousands of short-lived objects without cycles (freed by
    reference counting); the collections they would trigger cost 15 to 25 % of a rebuild's
    time. Collection resumes between batches.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._inside = 0

    def __enter__(self) -> None:
        with self._lock:
            self._inside += 1
            if self._inside == 1 and gc.isenabled():
                gc.disable()
                self._disabled = True

    def __exit__(self, *exc: object) -> None:
        with self._lock:
            self._inside -= 1
            if self._inside == 0 and getattr(self, "_disabled", False):
                self._disabled = False
                gc.enable()


_COLLECTOR = _CollectorPause()


class ViewStalled(Exception):
    """A view met an event it cannot apply (while catching up on demand)."""


class _Poison(Exception):
    """A batch that cannot be applied (not because the database is away)."""


def create_tables(
    conn: psycopg.Connection[Any], view: View, tables: Tables, *, indexes: bool = True
) -> bool:
    """Create the view's tables that do not exist (with their indexes). True if any was."""
    created = False
    with conn.transaction():
        # Two processes starting together take turns.
        conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"views:{tables.schema}",))
        Positions(tables.schema).create(conn)
        for table in view.tables:
            name = tables[table.name]
            found = conn.execute("SELECT to_regclass(%s)", (name.as_string(conn),)).fetchone()
            if found is not None and found[0] is not None:
                continue
            conn.execute(SQL("CREATE TABLE {} ({})").format(name, SQL(table.columns)))
            if indexes:
                create_indexes(conn, view, tables, only=table.name)
            created = True
    return created


def create_indexes(
    conn: psycopg.Connection[Any], view: View, tables: Tables, only: str | None = None
) -> None:
    """The view's secondary indexes (a rebuild adds them once its tables are filled)."""
    for table in view.tables:
        if only is not None and table.name != only:
            continue
        for columns in table.indexes:
            conn.execute(SQL("CREATE INDEX ON {} ({})").format(tables[table.name], SQL(columns)))


class _ReadAhead:
    """Reads a batch's rows in a thread, on a connection of its own, for the next step."""

    def __init__(
        self, conn: psycopg.Connection[Any], reader: EventReader, topics: list[str]
    ) -> None:
        self._conn, self._reader, self._topics = conn, reader, topics
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="read-ahead")
        self._key: tuple[int, int] | None = None
        self._end = 0
        self._rows: Future[list[tuple[Any, ...]]] | None = None

    def start(self, after: int, end: int, limit: int) -> None:
        """Read the rows of topics in (after, end], at most `limit` (committed rows only)."""
        self._key, self._end = (after, limit), end
        self._rows = self._pool.submit(
            self._reader.rows, self._conn, after, end, self._topics, limit
        )

    def take(self, after: int, limit: int) -> tuple[int, list[tuple[Any, ...]]] | None:
        """(end, rows) read ahead for a step from `after` with `limit`, else None."""
        rows, self._rows = self._rows, None
        if rows is None or self._key != (after, limit):
            return None
        return self._end, rows.result()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        self._conn.close()


class ViewRunner:
    """Applies the store's events to one view (its live tables, or a rebuild's shadow)."""

    def __init__(
        self,
        view: View,
        schema: str,
        *,
        shadow: bool = False,
        batch_size: int = 5000,
        poll_s: float = 1.0,
        metrics: ProjectionMetrics | None = None,
    ) -> None:
        self.view = view
        self.key = view.name + (SHADOW if shadow else "")
        """The view's row in the positions table."""
        self.tables = Tables(schema, view.tables, SHADOW if shadow else "")
        self.reader = EventReader(schema)
        self.positions = Positions(schema)
        self.batch_size = batch_size
        self.poll_s = poll_s
        self.metrics = metrics or ProjectionMetrics()
        self.wake = threading.Event()
        """Set when new events may be stored (a notification)."""
        self._topics = view.topics()
        self._limit = batch_size
        self._retry_stall = True
        self._skipped: set[int] | None = None
        self._current_since = time.monotonic()
        self.stalled_at: int | None = None
        self.stall_error = ""
        self._ahead: _ReadAhead | None = None
        self._window = _WINDOW[0]

    # -- one batch ---------------------------------------------------------------------

    def prepare(self, conn: psycopg.Connection[Any], *, start: int = 0) -> None:
        """Create the view's tables and its position row where missing."""
        create_tables(conn, self.view, self.tables)
        self.positions.start(conn, self.key, start)

    def step(self, conn: psycopg.Connection[Any]) -> int | None:
        """Apply the next batch; the number of events applied, or None when there is
        nothing to do now (at the head, or stalled). A batch may move the position over
        events of other views only (0 applied).

        Raises psycopg's `OperationalError` or `InterfaceError` when the database is
        away; nothing is committed then.
        """
        while True:
            started = time.perf_counter()
            try:
                return self._step(conn, started)
            except _Poison as poison:
                rows, position, exc = poison.args
                if len(rows) > 1:
                    self._limit = max(1, len(rows) // 2)  # find the one that fails
                    continue
                self._stall(conn, position, rows[0], exc)
                return None

    def _step(self, conn: psycopg.Connection[Any], started: float) -> int | None:
        m, name = self.metrics, self.view.name
        with conn.transaction():
            row = self.positions.lock(conn, self.key)
            if row.state == "stalled" and not self._retry_stall:
                self.stalled_at, self.stall_error = row.stalled_at, row.error or ""
                m.stalled.labels(name).set(1)
                return None
            if row.state == "running" and self.stalled_at is not None:  # skipped on purpose
                log.info("view %s: going on after position %d", name, row.position)
                self.stalled_at, self._skipped = None, None
                m.stalled.labels(name).set(0)
            if self._skipped is None:
                self._skipped = self.positions.skipped(conn, self.view.name)
            head = self.reader.head(conn)
            ahead = self._ahead.take(row.position, self._limit) if self._ahead else None
            if ahead is not None:
                end, rows = ahead
            else:
                # A bounded range of positions: the plan stays an index range scan whatever
                # the table's statistics say (a range to the head may be read whole, sorted).
                end = min(head, row.position + self._window * self._limit)
                rows = self.reader.rows(conn, row.position, end, self._topics, self._limit)
            upto = rows[-1][0] if len(rows) == self._limit else end
            if len(rows) < self._limit // 2 and end < head:
                self._window = min(self._window * 2, _WINDOW[1])
            if self._ahead is not None and upto < head:
                self._ahead.start(upto, min(head, upto + self._window * self._limit), self._limit)
            if self._skipped:
                rows = [r for r in rows if r[0] not in self._skipped]
            self._observe(row.position, head, caught_up=upto == row.position)
            if upto == row.position:
                return None
            try:
                with _COLLECTOR:
                    batch = self.reader.decode(rows)
                    if batch:
                        with conn.cursor() as curs:
                            self.view.apply(curs, self.tables, batch)
            except Exception as exc:
                if is_outage(exc, conn):
                    raise
                raise _Poison(rows, row.position, exc) from exc
            self.positions.advance(conn, self.key, upto)
        self._limit = min(self.batch_size, self._limit * 2)
        self._retry_stall = False  # a stall met again from now on stops the view
        m.applied.labels(name).inc(len(rows))
        m.batch_seconds.labels(name).observe(time.perf_counter() - started)
        self._observe(upto, head, caught_up=upto == head)
        return len(rows)

    def _observe(self, position: int, head: int, *, caught_up: bool) -> None:
        m, name = self.metrics, self.view.name
        m.position.labels(name).set(position)
        m.head.labels(name).set(head)
        m.lag_events.labels(name).set(head - position)
        now = time.monotonic()
        if caught_up:
            self._current_since = now
        m.lag_seconds.labels(name).set(0 if caught_up else now - self._current_since)

    def _stall(
        self, conn: psycopg.Connection[Any], position: int, row: tuple[Any, ...], exc: Exception
    ) -> None:
        at, _, _, topic, _ = row
        error = f"{type(exc).__name__}: {exc}"
        with conn.transaction():
            self.positions.stall(conn, self.key, position, at, error)
        self.stalled_at, self.stall_error = at, error
        self._limit = self.batch_size
        self._retry_stall = False
        self.metrics.stalled.labels(self.view.name).set(1)
        log.error(
            "view %s stalled at position %d (%s): %s; the other views go on. Fix the view "
            "and restart, or move past it: pipeline projections skip %s %d",
            self.key,
            at,
            topic,
            error,
            self.view.name,
            at,
        )

    def catch_up(
        self,
        conn: psycopg.Connection[Any],
        progress: Callable[[int], None] | None = None,
        *,
        read_ahead: Connect | None = None,
    ) -> int:
        """Apply batches until the view is at the head; the number of events applied.

        With `read_ahead`, the next batch's events are read on a connection of its own
        while this one is applied (PostgreSQL reads while Python decodes).
        """
        total = 0
        if read_ahead is not None:
            self._ahead = _ReadAhead(read_ahead(), self.reader, self._topics)
        try:
            while True:
                n = self.step(conn)
                if self.stalled_at is not None:
                    raise ViewStalled(
                        f"view {self.key} stopped at position {self.stalled_at}, an event it "
                        f"cannot apply: {self.stall_error}"
                    )
                if n is None:
                    return total
                total += n
                if progress is not None:
                    progress(self.positions.get(conn, self.key).position)
        finally:
            if self._ahead is not None:
                self._ahead.close()
                self._ahead = None

    # -- as a thread -------------------------------------------------------------------

    def run(self, connect: Connect, stop: threading.Event, *, standby_s: float = 5.0) -> None:
        """Keep the view current until `stop` is set; stand by while another process does."""
        delay = 0.5
        conn: psycopg.Connection[Any] | None = None
        name = self.view.name
        lock_key = f"view:{self.tables.schema}.{self.key}"
        # Processes started together take views in a random order, so they share them.
        stop.wait(random.uniform(0, 0.2))
        while not stop.is_set():
            try:
                if conn is None:
                    conn = connect()
                    self.prepare(conn)
                    taken = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (lock_key,))
                    row = taken.fetchone()
                    if not (row and row[0]):
                        self.metrics.active.labels(name).set(0)
                        conn.close()
                        conn = None
                        stop.wait(standby_s)
                        continue
                    self.metrics.active.labels(name).set(1)
                    log.info("view %s: kept by this process", name)
                self.wake.clear()
                if self.step(conn) is None:
                    self.wake.wait(self.poll_s)
                delay = 0.5
            except Exception as exc:
                if is_outage(exc, conn):
                    log.warning("view %s: database away (%s); again in %.1f s", name, exc, delay)
                else:  # a bug, or a table changed under it: not the events' fault
                    log.exception("view %s: unexpected error; again in %.1f s", name, delay)
                self.metrics.active.labels(name).set(0)
                if conn is not None:
                    conn.close()
                conn = None
                stop.wait(delay)
                delay = min(delay * 2, 10.0)
        if conn is not None:
            conn.close()
