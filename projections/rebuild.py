"""Rebuilding a view from the events, beside the live one, then swapping it in.

The rebuild fills shadow tables (`<table>__next`) from a position (0: from the first
event) up to the head of the store while the live view keeps answering queries and
following new events. Then, in one transaction: the live view's position row is locked
(its runner finishes the batch in hand and waits), the shadow catches up with the last
events, the shadow tables take the live tables' names, and the live position becomes
the shadow's. Positions skipped on purpose in the live view are skipped again.

A rebuild is one Python thread, bound by decoding and applying events while PostgreSQL
writes; `rebuild_views` rebuilds several views at once, each in a process of its own,
so that every core works.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, BrokenExecutor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.sql import SQL, Identifier

from . import view
from .positions import Positions
from .runner import Connect, ViewRunner, ViewStalled, create_indexes, create_tables
from .view import View

__all__ = ["RebuildFailed", "RebuildRefused", "Rebuilt", "rebuild", "rebuild_lock", "rebuild_views"]


class RebuildRefused(Exception):
    """Another rebuild of the same view is running."""


class RebuildFailed(Exception):
    """A rebuild in another process stopped on an error (its type and message)."""


@dataclass(frozen=True)
class Rebuilt:
    """What a rebuild did."""

    view: str
    events: int
    position: int
    seconds: float


def rebuild(
    conn: psycopg.Connection[Any],
    schema: str,
    view: View,
    *,
    after: int = 0,
    batch_size: int = 5000,
    progress: Callable[[int], None] | None = None,
    read_ahead: Connect | None = None,
) -> Rebuilt:
    """Rebuild `view` from the events after position `after`, then swap it in.

    `conn` must be in autocommit mode; `read_ahead` opens a second connection (like
    `conn`) that reads the next events while a batch is applied. Raises
    `RebuildRefused` when another rebuild of the view runs, `ViewStalled` when an
    event stops the rebuild (the live view is left as it was).
    """
    started = time.perf_counter()
    key = rebuild_lock(schema, view.name)
    taken = conn.execute("SELECT pg_try_advisory_lock(hashtext(%s))", (key,)).fetchone()
    if not (taken and taken[0]):
        raise RebuildRefused(f"a rebuild of view {view.name!r} is running already")
    positions = Positions(schema)
    live = ViewRunner(view, schema)
    shadow = ViewRunner(view, schema, shadow=True, batch_size=batch_size)
    try:
        live.prepare(conn)
        _drop(conn, shadow)
        create_tables(conn, view, shadow.tables, indexes=False)  # indexes once filled
        positions.reset(conn, shadow.key, after)
        events = shadow.catch_up(conn, progress, read_ahead=read_ahead)
        with conn.transaction():  # indexes of filled tables: sorts in memory where they fit
            conn.execute("SET LOCAL maintenance_work_mem = '256MB'")
            create_indexes(conn, view, shadow.tables)
        for table in view.tables:  # statistics for the planner before the tables go live
            conn.execute(SQL("ANALYZE {}").format(shadow.tables[table.name]))
        # What arrived meanwhile, in committed batches: the swap applies only the rest.
        events += shadow.catch_up(conn, progress, read_ahead=read_ahead)
        with conn.transaction():
            positions.lock(conn, view.name)
            events += shadow.catch_up(conn, progress)
            for table in view.tables:
                old = f"{live.tables.bare(table.name)}__old"
                conn.execute(
                    SQL("ALTER TABLE {} RENAME TO {}").format(
                        live.tables[table.name], Identifier(old)
                    )
                )
                conn.execute(
                    SQL("ALTER TABLE {} RENAME TO {}").format(
                        shadow.tables[table.name], Identifier(live.tables.bare(table.name))
                    )
                )
                conn.execute(SQL("DROP TABLE {}.{}").format(Identifier(schema), Identifier(old)))
            position = positions.get(conn, shadow.key).position
            positions.advance(conn, view.name, position)
            positions.drop(conn, shadow.key)
    except BaseException:
        _drop(conn, shadow)
        raise
    finally:
        with contextlib.suppress(psycopg.Error):  # a broken connection released it already
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (key,))
    return Rebuilt(view.name, events, position, time.perf_counter() - started)


def rebuild_views(
    connection: Mapping[str, Any],
    schema: str,
    names: Sequence[str],
    *,
    after: int = 0,
    batch_size: int = 5000,
    jobs: int | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> dict[str, Rebuilt | Exception]:
    """Rebuild the views `names` (each as `rebuild` does), up to `jobs` at a time.

    `connection`: keyword arguments of `psycopg.connect`. With more than one job each
    view is rebuilt in a process of its own (default: one per core, at most one per
    view). `progress(name, position)` follows each view. Returns each view's `Rebuilt`,
    or the exception that stopped it (`RebuildRefused`, `ViewStalled`; any other error
    is raised in this process, and comes as `RebuildFailed` from a child): one view that
    fails leaves the others to finish and swap in. An unknown name raises `KeyError`
    before anything starts.
    """
    for name in names:
        view(name)
    jobs = max(1, min(len(names), jobs or os.cpu_count() or 1))
    results: dict[str, Rebuilt | Exception] = {}
    if jobs == 1:
        for name in names:
            try:
                results[name] = _rebuild_one(connection, schema, name, after, batch_size, progress)
            except (RebuildRefused, ViewStalled) as exc:
                results[name] = exc
        return results
    context = multiprocessing.get_context("spawn")  # no fork of this process's threads
    positions: Any = context.SimpleQueue()
    with ProcessPoolExecutor(
        jobs, mp_context=context, initializer=_child_started, initargs=(positions,)
    ) as pool:
        futures: dict[Future[Rebuilt], str] = {
            pool.submit(_rebuild_child, dict(connection), schema, name, after, batch_size): name
            for name in names
        }
        pending: set[Future[Rebuilt]] = set(futures)
        while pending:
            _, pending = wait(pending, timeout=0.1, return_when=FIRST_COMPLETED)
            while not positions.empty():
                name, position = positions.get()
                if progress is not None:
                    progress(name, position)
        for future, name in futures.items():
            try:
                results[name] = future.result()
            except (RebuildRefused, ViewStalled, RebuildFailed) as exc:
                results[name] = exc
            except BrokenExecutor as exc:  # a process killed (the shadow tables are left)
                results[name] = RebuildFailed(f"its process ended: {exc}")
    return results


def _rebuild_one(
    connection: Mapping[str, Any],
    schema: str,
    name: str,
    after: int,
    batch_size: int,
    progress: Callable[[str, int], None] | None,
) -> Rebuilt:
    def connect() -> psycopg.Connection[Any]:
        return psycopg.connect(**connection, autocommit=True)

    def report(position: int) -> None:
        if progress is not None:
            progress(name, position)

    with connect() as conn:
        return rebuild(
            conn,
            schema,
            view(name),
            after=after,
            batch_size=batch_size,
            progress=report,
            read_ahead=connect,
        )


_positions: Any = None
"""In a child process: the queue its rebuild's positions go to."""


def _child_started(positions: Any) -> None:
    global _positions
    _positions = positions


def _rebuild_child(
    connection: Mapping[str, Any], schema: str, name: str, after: int, batch_size: int
) -> Rebuilt:
    try:
        return _rebuild_one(
            connection,
            schema,
            name,
            after,
            batch_size,
            lambda view, position: _positions.put((view, position)),
        )
    except (RebuildRefused, ViewStalled):
        raise
    except Exception as exc:  # what reaches the parent must be picklable
        raise RebuildFailed(f"{type(exc).__name__}: {exc}") from None


def rebuild_lock(schema: str, view: str) -> str:
    """The advisory lock a rebuild of `view` holds (one rebuild of a view at a time)."""
    return f"rebuild:{schema}.{view}"


def _drop(conn: psycopg.Connection[Any], shadow: ViewRunner) -> None:
    """Remove a shadow's tables and position (of this rebuild, or one that died)."""
    if conn.closed or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
        return
    for table in shadow.view.tables:
        conn.execute(SQL("DROP TABLE IF EXISTS {}").format(shadow.tables[table.name]))
    shadow.positions.drop(conn, shadow.key)
