"""What the routers' endpoints are given: the API's context, a connection, shared parameters.

`create_app` builds one `ApiContext` and keeps it on `app.state`; the routers are module
level (FastAPI's "bigger applications" layout) and reach it through these dependencies.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
from fastapi import Depends, Query, Request
from prometheus_client import CollectorRegistry
from psycopg_pool import ConnectionPool
from pydantic import AwareDatetime

from projections.positions import Positions
from projections.queries import Queries

from ..audit.note import Verifier
from ..audit.tables import AuditTables
from ..settings import Settings
from ..store.reader import EventReader

if TYPE_CHECKING:
    from .auth import Authenticator
    from .sessions import Sessions

__all__ = [
    "ApiContext",
    "Context",
    "Cursor",
    "Db",
    "Limit",
    "Since",
    "Until",
    "context",
    "db",
]


@dataclass(frozen=True)
class ApiContext:
    """The services one API application answers with (built once by `create_app`)."""

    settings: Settings
    pool: ConnectionPool[psycopg.Connection[Any]]
    registry: CollectorRegistry
    queries: Queries
    reader: EventReader
    positions: Positions
    audit_tables: AuditTables
    witnesses: tuple[Verifier, ...]
    auth: Authenticator
    sessions: Sessions

    @property
    def schema(self) -> str:
        """The PostgreSQL schema of the store and its views."""
        return self.settings.postgres_schema


def context(request: Request) -> ApiContext:
    """The context of the application answering `request`."""
    found = request.app.state.api
    assert isinstance(found, ApiContext)
    return found


Context = Annotated[ApiContext, Depends(context)]


def db(api: Context) -> Iterator[psycopg.Connection[Any]]:
    """A connection from the API's pool for one request."""
    # A database that fails is answered by the error handlers (503 or 500).
    with api.pool.connection() as conn:
        yield conn


Db = Annotated[psycopg.Connection[Any], Depends(db)]

Limit = Annotated[int, Query(ge=1, le=1000)]
Since = Annotated[
    AwareDatetime | None,
    Query(description="from this time (inclusive; ISO 8601 with its offset: ...Z or +01:00)"),
]
Until = Annotated[
    AwareDatetime | None,
    Query(description="before this time (ISO 8601 with its offset: ...Z or +01:00)"),
]
Cursor = Annotated[str | None, Query(description="`next_cursor` of the previous page")]
