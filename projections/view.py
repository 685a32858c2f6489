"""What a view is: its tables, the events it reads, and how a batch of them changes it.

A view owns a few PostgreSQL tables in the event store's schema. The runner hands it the
events of one batch, in position order, with a cursor inside the transaction that also
moves the view's position, so a batch is applied exactly once or not at all. The same
code builds the live tables and a rebuild's shadow tables (`<table>__next`), so a
rebuild gives what the live run gives.
"""

from __future__ import annotations

import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Context, Decimal
from typing import Any, ClassVar

import orjson
import psycopg
from psycopg.sql import SQL, Composed, Identifier
from psycopg.types.json import Json, Jsonb

from pipeline.store.domain import topics_of
from pipeline.store.reader import Positioned

__all__ = [
    "SHADOW",
    "Table",
    "Tables",
    "View",
    "add_exact",
    "copy_rows",
    "decimal",
    "json",
    "json_as_sent",
    "minute",
    "parse_time",
    "text",
    "upsert",
]

SHADOW = "__next"
"""Suffix of a rebuild's tables until they replace the live ones."""


@dataclass(frozen=True)
class Table:
    """One table of a view: its columns (SQL) and the column lists it is indexed on."""

    name: str
    columns: str
    indexes: tuple[str, ...] = ()


class Tables:
    """The qualified names of a view's tables, live or shadow."""

    def __init__(self, schema: str, tables: Iterable[Table], suffix: str = "") -> None:
        self.schema = schema
        self.suffix = suffix
        self._names = {t.name: f"{t.name}{suffix}" for t in tables}

    def __getitem__(self, name: str) -> Composed:
        return SQL("{}.{}").format(Identifier(self.schema), Identifier(self._names[name]))

    def bare(self, name: str) -> str:
        """The table's name without the schema."""
        return self._names[name]


class View(ABC):
    """A read model kept from the store's events."""

    name: ClassVar[str]
    """The view's name in commands, positions and metrics."""
    description: ClassVar[str]
    tables: ClassVar[tuple[Table, ...]]
    events: ClassVar[tuple[type, ...]]
    """Event classes the view reads (their topics, old names included)."""

    @classmethod
    def topics(cls) -> list[str]:
        """Topics of the events this view reads."""
        return [topic for event in cls.events for topic in topics_of(event)]

    @abstractmethod
    def apply(self, curs: psycopg.Cursor[Any], tables: Tables, batch: Sequence[Positioned]) -> None:
        """Change the view's tables by the events of `batch` (in position order)."""


def parse_time(value: str | datetime) -> datetime:
    """A timestamp from a stored payload (ISO 8601, as pydantic writes it)."""
    return value if isinstance(value, datetime) else datetime.fromisoformat(value)


def minute(value: datetime) -> datetime:
    """The start of the minute `value` falls in."""
    return value.replace(second=0, microsecond=0)


_EXACT = Context(prec=1000)
"""Enough digits that adding float64 values never rounds."""


def decimal(value: float) -> Decimal:
    """A float as the decimal it was written as in JSON (exactly)."""
    return Decimal(repr(float(value)))


def add_exact(a: Decimal, b: Decimal) -> Decimal:
    """`a + b` without rounding: sums of views must not depend on how events were batched."""
    return _EXACT.add(a, b)


def copy_rows(
    curs: psycopg.Cursor[Any],
    table: Composed | Identifier,
    columns: Sequence[str],
    rows: Iterable[Sequence[Any]],
) -> None:
    """Append rows to `table` with a binary COPY (the fastest way in).

    Values must be of the columns' types (jsonb values wrapped with `json`).
    """
    names = SQL(", ").join(Identifier(c) for c in columns)
    key = (table.as_string(curs), tuple(columns))
    types = _TYPES.get(key)
    if types is None:
        curs.execute(SQL("SELECT {} FROM {} LIMIT 0").format(names, table))
        types = _TYPES[key] = [column.type_code for column in curs.description or ()]
    with curs.copy(SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(table, names)) as copy:
        copy.set_types(types)
        for row in rows:
            copy.write_row(row)


_TYPES: dict[tuple[str, tuple[str, ...]], list[int]] = {}
"""Column types of the tables copied into, by name (a rebuilt table keeps its types)."""


def json(value: Any) -> Jsonb:
    """A value for a jsonb column (encoded by orjson; NUL characters replaced, see `text`)."""
    return Jsonb(value, dumps=_dumps)


def json_as_sent(value: Any) -> Json:
    """A value for a json column, which keeps a producer's JSON exactly as sent.

    jsonb would not: its numbers are `numeric`, so a float such as 1.999871663933031e16
    reads back as the integer 19998716639330310, and it cannot hold a NUL character.
    """
    return Json(value, dumps=orjson.dumps)


# "\u0000" as JSON writes a NUL character: not after an odd number of backslashes.
_NUL_ESCAPE = re.compile(rb"(?<!\\)((?:\\\\)*)\\u0000")


def _dumps(value: Any) -> bytes:
    data = orjson.dumps(value)
    if b"\\u0000" in data:
        data = _NUL_ESCAPE.sub(rb"\1\\ufffd", data)
    return data


def text(value: str | None) -> str | None:
    """Free text for a text column: PostgreSQL's text and jsonb cannot hold NUL, which a
    valid message may carry; it becomes U+FFFD in the view (the store keeps it)."""
    if value is not None and "\x00" in value:
        return value.replace("\x00", "\ufffd")
    return value


def upsert(
    curs: psycopg.Cursor[Any],
    tables: Tables,
    name: str,
    columns: Sequence[str],
    key: Sequence[str],
    update: str,
    rows: Sequence[Sequence[Any]],
) -> None:
    """Insert `rows` into table `name`, or merge each into the row with the same `key`.

    `update` (SQL) reads the new values as `excluded.<column>` and the stored ones as
    `t.<column>`. The rows go by COPY into a temporary table of the session (made once),
    then one INSERT ... ON CONFLICT merges them, and the temporary table is emptied.
    """
    if not rows:
        return
    table = tables[name]
    staging = Identifier(f"staging_{tables.bare(name)}")
    curs.execute(
        SQL(
            "CREATE TEMPORARY TABLE IF NOT EXISTS {} (LIKE {} INCLUDING DEFAULTS) "
            "ON COMMIT DELETE ROWS"
        ).format(staging, table)
    )
    copy_rows(curs, staging, columns, rows)
    names = SQL(", ").join(Identifier(c) for c in columns)
    curs.execute(
        SQL(
            "INSERT INTO {table} AS t ({names}) SELECT {names} FROM {staging} "
            "ON CONFLICT ({key}) DO UPDATE SET {update}"
        ).format(
            table=table,
            names=names,
            staging=staging,
            key=SQL(", ").join(Identifier(c) for c in key),
            update=SQL(update),  # the views' own constant SQL
        )
    )
    # Emptied now too: several batches may share one transaction (a rebuild's swap).
    curs.execute(SQL("DELETE FROM {}").format(staging))
