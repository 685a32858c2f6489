"""The query API: the views, stored events, projection positions, health and metrics.

Every `/v1` endpoint needs a bearer token from `PIPELINE_API_TOKENS` with the scope it
names (`read` to query, `operate` to skip a poison event). Lists are paged with a
cursor: pass a page's `next_cursor` as `cursor` to get the next one. Times (`since`,
`until`) are ISO 8601 with their UTC offset (`2026-11-27T10:00:00Z`): a time without one
is refused. Every error is `{"error": code, "detail": message}`.
"""

# No `from __future__ import annotations`: FastAPI reads the endpoints' annotations,
# which name types local to `create_app`.
import hmac
import time
from collections.abc import Callable, Iterator
from contextlib import asynccontextmanager
from typing import Annotated, Any, Literal

import psycopg
from fastapi import Depends, FastAPI, Query, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from psycopg_pool import ConnectionPool
from pydantic import AwareDatetime

from projections import VIEWS
from projections.positions import Positions, SkipRefused
from projections.queries import Page, Queries
from projections.status import view_status
from schemas import Severity
from schemas.monitoring import HealthStatus

from ..settings import Settings
from ..store.reader import EventReader
from .audit import audit_router
from .errors import (
    ERROR_RESPONSES,
    REQUEST_ID,
    ApiError,
    install_error_handlers,
    request_id,
    server_error,
)

__all__ = ["create_app"]

Scope = Literal["read", "operate"]
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


def create_app(settings: Settings, registry: CollectorRegistry | None = None) -> FastAPI:
    """The API application on the store's database (a connection pool opened on start)."""
    schema = settings.postgres_schema
    queries = Queries(schema)
    reader = EventReader(schema)
    positions = Positions(schema)
    registry = registry if registry is not None else CollectorRegistry()
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
    pool = ConnectionPool(
        kwargs={**settings.postgres_connection(), "autocommit": True},
        min_size=1,
        max_size=max(2, settings.postgres_pool_size),
        open=False,
        timeout=settings.postgres_connect_timeout(),
        name="api",
    )

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> Any:
        pool.open(wait=False)
        yield
        pool.close()

    app = FastAPI(
        title="Event pipeline API",
        version="1",
        description=__doc__,
        lifespan=lifespan,
        responses=ERROR_RESPONSES,
    )
    install_error_handlers(app)

    def db() -> Iterator[psycopg.Connection[Any]]:
        # A database that fails is answered by the error handlers (503 or 500).
        with pool.connection() as conn:
            yield conn

    app.include_router(audit_router(settings, db))  # public: see pipeline.api.audit

    bearer = HTTPBearer(auto_error=False)

    def needs(scope: Scope) -> Callable[..., None]:
        def check(
            credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
        ) -> None:
            if credentials is None:
                raise ApiError(401, "unauthenticated", "send Authorization: Bearer <token>")
            scopes = _scopes(settings, credentials.credentials)
            if scopes is None:
                raise ApiError(401, "unauthenticated", "unknown token")
            if scope not in scopes:
                raise ApiError(403, "forbidden", f"this token lacks the {scope!r} scope")

        return check

    read = [Depends(needs("read"))]
    Db = Annotated[psycopg.Connection[Any], Depends(db)]

    @app.middleware("http")
    async def measure(request: Request, call_next: Any) -> Any:
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

    # -- health ------------------------------------------------------------------------

    @app.get("/healthz", tags=["health"])
    def healthz() -> dict[str, str]:
        """The process lives."""
        return {"status": "alive"}

    @app.get("/readyz", tags=["health"])
    def readyz(request: Request) -> JSONResponse:
        """The database answers."""
        try:
            with pool.connection(timeout=2.0) as conn:
                conn.execute("SELECT 1")
        except Exception as exc:
            detail = "the database does not answer"
            problems = [detail]
            return server_error(
                request, 503, "database_unavailable", detail, exc, ready=False, problems=problems
            )
        return JSONResponse({"ready": True, "problems": []})

    @app.get("/metrics", tags=["health"], response_class=PlainTextResponse)
    def metrics() -> PlainTextResponse:
        """Prometheus metrics of the API."""
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")

    # -- security ----------------------------------------------------------------------

    @app.get("/v1/security/events", tags=["security"], dependencies=read)
    def security_events(
        conn: Db,
        since: Since = None,
        until: Until = None,
        source: str | None = None,
        zone: str | None = None,
        kind: str | None = None,
        severity: Severity | None = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        """Security events, the latest occurred first (`zone=` with no value: no zone)."""
        return queries.security_events(
            conn,
            since=since,
            until=until,
            source=source,
            zone=zone,
            kind=kind,
            severity=severity.value if severity else None,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/security/counts", tags=["security"], dependencies=read)
    def security_counts(
        conn: Db,
        since: Since = None,
        until: Until = None,
        zone: str | None = None,
        severity: Severity | None = None,
        limit: Limit = 1000,
        cursor: Cursor = None,
    ) -> Page:
        """Events per minute, severity and zone (zone "" for none), the latest minute first."""
        return queries.security_counts(
            conn,
            since=since,
            until=until,
            zone=zone,
            severity=severity.value if severity else None,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/security/totals", tags=["security"], dependencies=read)
    def security_totals(
        conn: Db,
        since: Since = None,
        until: Until = None,
        by: Literal["severity", "zone"] = "severity",
    ) -> list[dict[str, Any]]:
        """Events per severity (or zone) over a time range."""
        return queries.security_totals(conn, since=since, until=until, by=by)

    # -- services ----------------------------------------------------------------------

    @app.get("/v1/services", tags=["services"], dependencies=read)
    def services(
        conn: Db,
        service: str | None = None,
        status: HealthStatus | None = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        """The current status of every service instance, with its last report's checks."""
        return queries.services(
            conn,
            service=service,
            status=status.value if status else None,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/services/totals", tags=["services"], dependencies=read)
    def service_totals(conn: Db) -> list[dict[str, Any]]:
        """Instances per current status."""
        return queries.status_totals(conn)

    @app.get("/v1/services/transitions", tags=["services"], dependencies=read)
    def transitions(
        conn: Db,
        service: str | None = None,
        instance: str | None = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = 100,
        cursor: Cursor = None,
    ) -> Page:
        """Status changes, the latest stored first."""
        return queries.transitions(
            conn,
            service=service,
            instance=instance,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/services/{service}/{instance}", tags=["services"], dependencies=read)
    def service(conn: Db, service: str, instance: str) -> dict[str, Any]:
        """One instance's status and last report's checks (as listed), and `earlier_checks`:
        those only earlier reports named, in the state they were last reported."""
        found = queries.service(conn, service, instance)
        if found is None:
            raise ApiError(404, "not_found", f"no reports from {service}/{instance}")
        return found

    # -- metrics -----------------------------------------------------------------------

    @app.get("/v1/metrics/rollups", tags=["metrics"], dependencies=read)
    def rollups(
        conn: Db,
        service: str | None = None,
        instance: str | None = None,
        name: str | None = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = 1000,
        cursor: Cursor = None,
    ) -> Page:
        """Per-minute count, sum, min, max and last of each metric, the latest minute first."""
        return queries.rollups(
            conn,
            service=service,
            instance=instance,
            name=name,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

    @app.get("/v1/metrics/totals", tags=["metrics"], dependencies=read)
    def metric_totals(
        conn: Db,
        name: str,
        service: str | None = None,
        instance: str | None = None,
        since: Since = None,
        until: Until = None,
    ) -> list[dict[str, Any]]:
        """One metric over a time range, per service, instance and label set."""
        return queries.metric_totals(
            conn, name=name, service=service, instance=instance, since=since, until=until
        )

    # -- cameras -----------------------------------------------------------------------

    @app.get("/v1/cameras", tags=["cameras"], dependencies=read)
    def cameras(conn: Db) -> list[dict[str, Any]]:
        """Every camera: frames analysed and skipped, detections, mean inference, model."""
        return queries.cameras(conn)

    @app.get("/v1/cameras/detections", tags=["cameras"], dependencies=read)
    def detections(
        conn: Db,
        camera: str | None = None,
        label: str | None = None,
        since: Since = None,
        until: Until = None,
        limit: Limit = 1000,
        cursor: Cursor = None,
    ) -> Page:
        """Detections per camera, label and minute, the latest minute first."""
        return queries.detections(
            conn,
            camera=camera,
            label=label,
            since=since,
            until=until,
            limit=limit,
            cursor=cursor,
        )

    # -- events and projections ----------------------------------------------------------

    @app.get("/v1/events/{ident}", tags=["events"], dependencies=read)
    def event(conn: Db, ident: str) -> dict[str, Any]:
        """One stored event, by event id or by the producer's message id, with its position."""
        found = reader.find(conn, ident)
        if found is None:
            raise ApiError(404, "not_found", f"no stored event with id {ident!r}")
        return found.as_json()

    @app.get("/v1/projections", tags=["projections"], dependencies=read)
    def projections(conn: Db) -> list[dict[str, Any]]:
        """Each view's position, the head of the store, lag in events and seconds, state."""
        return [s.as_json() for s in view_status(conn, schema)]

    @app.post(
        "/v1/projections/{name}/skip",
        tags=["projections"],
        dependencies=[Depends(needs("operate"))],
    )
    def skip(conn: Db, name: str, position: int, note: str = "") -> dict[str, Any]:
        """Move a view stalled at `position` past that event (the skip is recorded)."""
        if name not in VIEWS:
            raise ApiError(404, "not_found", f"no view {name!r} (views: {', '.join(VIEWS)})")
        try:
            row = positions.skip(conn, name, position, note)
        except SkipRefused as exc:
            raise ApiError(409, "not_stalled_there", str(exc)) from None
        return {"view": name, "skipped": position, "position": row.position}

    return app


def _scopes(settings: Settings, token: str) -> tuple[Scope, ...] | None:
    """The scopes of `token`, or None if it is not one of the settings' tokens."""
    found = None
    for known, scopes in settings.api_tokens.items():
        # Compared in constant time, and every token is compared.
        if hmac.compare_digest(known.encode(), token.encode()):
            found = scopes
    return found
