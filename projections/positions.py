"""Where each view stands: its position, whether it is stalled, and the events skipped on purpose.

`projection_positions` has one row per view (and one per rebuild in progress, named
`<view>__next`). A runner locks its view's row (`FOR UPDATE`) in the transaction that
applies a batch and moves the position, so two runners of one view take turns and an
event is applied once. `projection_skips` records every `projections skip`.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row
from psycopg.sql import SQL, Composed, Identifier

__all__ = ["Position", "Positions", "SkipRefused"]


class SkipRefused(Exception):
    """`skip` was asked for an event the view is not stalled at."""


@dataclass(frozen=True)
class Position:
    """A view's row in `projection_positions`."""

    view: str
    position: int
    state: str
    """`running` or `stalled`."""
    stalled_at: int | None
    error: str | None
    updated_at: datetime


class Positions:
    """The positions and skips tables of one schema."""

    def __init__(self, schema: str) -> None:
        self.schema = schema
        self.table: Composed = SQL("{}.projection_positions").format(Identifier(schema))
        self.skips: Composed = SQL("{}.projection_skips").format(Identifier(schema))

    def create(self, conn: psycopg.Connection[Any]) -> None:
        """Create both tables if they do not exist (processes starting together take turns)."""
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", (f"views:{self.schema}",))
            self._create(conn)

    def _create(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (view text PRIMARY KEY, "
                "position bigint NOT NULL, state text NOT NULL DEFAULT 'running', "
                "stalled_at bigint, error text, updated_at timestamptz NOT NULL DEFAULT now())"
            ).format(self.table)
        )
        conn.execute(
            SQL(
                "CREATE TABLE IF NOT EXISTS {} (view text NOT NULL, position bigint NOT NULL, "
                "error text, note text, skipped_at timestamptz NOT NULL DEFAULT now(), "
                "PRIMARY KEY (view, position))"
            ).format(self.skips)
        )

    def start(self, conn: psycopg.Connection[Any], view: str, position: int = 0) -> None:
        """Give `view` a row at `position` unless it has one."""
        conn.execute(
            SQL("INSERT INTO {} (view, position) VALUES (%s, %s) ON CONFLICT DO NOTHING").format(
                self.table
            ),
            (view, position),
        )

    def reset(self, conn: psycopg.Connection[Any], view: str, position: int) -> None:
        """Set `view`'s row to `position`, running (for a rebuild's shadow)."""
        conn.execute(
            SQL(
                "INSERT INTO {} (view, position) VALUES (%s, %s) ON CONFLICT (view) DO UPDATE "
                "SET position = excluded.position, state = 'running', stalled_at = NULL, "
                "error = NULL, updated_at = now()"
            ).format(self.table),
            (view, position),
        )

    def lock(self, conn: psycopg.Connection[Any], view: str) -> Position:
        """`view`'s row, locked until the transaction ends."""
        return self._get(conn, view, lock=True)

    def get(self, conn: psycopg.Connection[Any], view: str) -> Position:
        """`view`'s row."""
        return self._get(conn, view, lock=False)

    def _get(self, conn: psycopg.Connection[Any], view: str, *, lock: bool) -> Position:
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT view, position, state, stalled_at, error, updated_at FROM {} "
                    "WHERE view = %s {}"
                ).format(self.table, SQL("FOR UPDATE" if lock else "")),
                (view,),
                prepare=True,
            )
            row = curs.fetchone()
        if row is None:
            raise LookupError(f"no position for view {view!r}")
        return Position(*row)

    def all(self, conn: psycopg.Connection[Any]) -> list[Position]:
        """Every row, by view name."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(
                SQL(
                    "SELECT view, position, state, stalled_at, error, updated_at FROM {} "
                    "ORDER BY view"
                ).format(self.table)
            )
            return [Position(*row) for row in curs.fetchall()]

    def advance(self, conn: psycopg.Connection[Any], view: str, position: int) -> None:
        """Move `view` to `position` (in the caller's transaction, after `lock`)."""
        conn.execute(
            SQL(
                "UPDATE {} SET position = %s, state = 'running', stalled_at = NULL, "
                "error = NULL, updated_at = clock_timestamp() WHERE view = %s"
            ).format(self.table),
            (position, view),
            prepare=True,
        )

    def stall(
        self, conn: psycopg.Connection[Any], view: str, position: int, at: int, error: str
    ) -> None:
        """Mark `view` stalled at the event at `at` (if it is still at `position`)."""
        conn.execute(
            SQL(
                "UPDATE {} SET state = 'stalled', stalled_at = %s, error = %s, "
                "updated_at = clock_timestamp() WHERE view = %s AND position = %s"
            ).format(self.table),
            (at, error, view, position),
        )

    def skip(self, conn: psycopg.Connection[Any], view: str, at: int, note: str = "") -> Position:
        """Move a view stalled at the event at `at` past it, and record that."""
        with conn.transaction():
            row = self.lock(conn, view)
            if row.state != "stalled" or row.stalled_at != at:
                where = f"stalled at {row.stalled_at}" if row.state == "stalled" else row.state
                raise SkipRefused(
                    f"view {view!r} is not stalled at position {at} (it is {where}, at "
                    f"position {row.position}); see `pipeline projections status`"
                )
            conn.execute(
                SQL("INSERT INTO {} (view, position, error, note) VALUES (%s, %s, %s, %s)").format(
                    self.skips
                ),
                (view, at, row.error, note or None),
            )
            self.advance(conn, view, at)
            return self.get(conn, view)

    def skipped(self, conn: psycopg.Connection[Any], view: str) -> set[int]:
        """Positions skipped on purpose in `view` (a rebuild skips them too)."""
        with conn.cursor(row_factory=tuple_row) as curs:
            curs.execute(SQL("SELECT position FROM {} WHERE view = %s").format(self.skips), (view,))
            return {row[0] for row in curs.fetchall()}

    def drop(self, conn: psycopg.Connection[Any], view: str) -> None:
        """Remove `view`'s row."""
        conn.execute(SQL("DELETE FROM {} WHERE view = %s").format(self.table), (view,))
