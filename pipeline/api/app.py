"""The query API: the views, stored events, projection positions, health and metrics.

Every `/v1` endpoint needs a bearer token with the scope it names (`read` to query,
`operate` to skip a poison event or acknowledge an incident): one of
`PIPELINE_API_TOKENS`, or an access token (JWT) of the identity provider the
`PIPELINE_OIDC_*` settings name; a browser signs in once with one (`POST /v1/session`)
and is then known by a session cookie. Lists are paged with a
cursor: pass a page's `next_cursor` as `cursor` to get the next one. Times (`since`,
`until`) are ISO 8601 with their UTC offset (`2026-11-27T10:00:00Z`): a time without one
is refused. Every error is `{"error": code, "detail": message}`.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry, Counter, Histogram
from psycopg_pool import ConnectionPool
from starlette.middleware.base import RequestResponseEndpoint

from projections.incidents.evidence import NatsLink
from projections.positions import Positions
from projections.queries import Queries

from ..audit.tables import AuditTables
from ..settings import Settings
from ..store.reader import EventReader
from .auth import Authenticator
from .deps import ApiContext
from .errors import ERROR_RESPONSES, REQUEST_ID, install_error_handlers, request_id, server_error
from .routes import ROUTERS, dashboard, docs
from .routes.audit import witness_keys
from .sessions import Sessions

__all__ = ["create_app"]


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    """The API application on the store's database (a connection pool opened on start);
    the audit witnesses' keys are read now."""
    schema = settings.postgres_schema
    pool: ConnectionPool[psycopg.Connection[Any]] = ConnectionPool(
        kwargs={**settings.postgres_connection(), "autocommit": True},
        min_size=1,
        max_size=max(2, settings.postgres_pool_size),
        open=False,
        timeout=settings.postgres_connect_timeout(),
        name="api",
    )
    auth = Authenticator.from_settings(settings)
    api = ApiContext(
        settings=settings,
        pool=pool,
        registry=registry if registry is not None else CollectorRegistry(),
        queries=Queries(schema),
        reader=EventReader(schema),
        positions=Positions(schema),
        audit_tables=AuditTables(schema),
        witnesses=tuple(witness_keys(settings)),
        auth=auth,
        sessions=Sessions.from_settings(settings, auth.tokens),
    )

    evidence = NatsLink(settings)  # the incidents' evidence frames, read from their bucket

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool.open(wait=False)
        yield
        await evidence.close()
        pool.close()

    app = FastAPI(
        title="Event pipeline API",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
        docs_url=None,  # served by routes.docs, from the package rather than a CDN
        redoc_url=None,
    )
    app.state.api = api
    app.state.evidence = evidence
    install_error_handlers(app)
    _measure(app, api.registry)
    for router in ROUTERS:
        app.include_router(router)
    app.include_router(dashboard.router)  # `/` and `/v1/stream`, with the stream's follower
    app.mount(docs.STATIC_PATH, docs.static_files(), name="static")
    return app


def _measure(app: FastAPI, registry: CollectorRegistry) -> None:
    """Count and time every request by route, and give every answer its request id."""
    requests = Counter(
        "pipeline_api_requests_total",
        "HTTP requests answered, by route and status.",
        ["route", "status"],
        registry=registry,
    )
    latency = Histogram(
        "pipeline_api_request_seconds",
        "Time to answer an HTTP request, by route.",
        ["route"],
        buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0),
        registry=registry,
    )

    @app.middleware("http")
    async def measure(request: Request, call_next: RequestResponseEndpoint) -> Response:
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except Exception as exc:  # a bug: answered in the one shape, logged with its trace
            response = server_error(request, 500, "internal_error", "the API failed", exc)
        response.headers[REQUEST_ID] = request_id(request)
        route = request.scope.get("route")
        name = getattr(route, "path", "unmatched")
        requests.labels(name, str(response.status_code)).inc()
        latency.labels(name).observe(time.perf_counter() - started)
        return response
